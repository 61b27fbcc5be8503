"""The first task of a run: the model directory and text, versioned with DVC where the project is a
DVC repository, and the content hashes every later task records (its lineage)."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task

from gamma.config import EMBEDDED, GammaConfig
from gamma.hashing import content_md5
from gamma.model.loading import embedded_model_dir
from gamma.run.workspace import Workspace
from tasks import tracking
from tasks.versioning import dvc_root, hash_inputs, produced_by_prepare, reproduce_and_push


@task(name="prepare inputs", retries=1)
def prepare(cfg: GammaConfig, use_dvc: bool = True) -> dict:
    """Model directory and text, versioned with DVC where the project is a DVC repo; content hashes."""
    log = get_run_logger()
    root = dvc_root() if use_dvc and cfg.pipeline.dvc else None
    reads = paths_read(cfg)
    produced = produced_by_prepare(root, reads) if root else set()
    dvc = {"outs": {}, "deps": {}}
    if produced:
        dvc.update(reproduce_and_push(root))
        log.info("DVC: stage 'prepare' of %s reproduced, %s file(s) pushed to the default remote", root, dvc["pushed"])
    ws = Workspace(cfg)
    ws.check_shapes()  # a group size the model's widths refuse: before any model load or Stage I
    inputs = {"model_dir": str(ws.model_dir), "model_md5": ws.model_hash, "text_md5": ws.text_hash,
              "text_dir_md5": content_md5(ws.text.calibration.parent), "git_commit": tracking.git_commit()}
    others = [p for p in reads if p.resolve() not in produced]
    if root and others:  # after the workspace has converted and prepared what it reads
        dvc["deps"] = hash_inputs(root, others)
        log.info("DVC: stage 'inputs' of %s hashes %s", root, ", ".join(dvc["deps"]))
    if root:
        inputs["dvc_outs"], inputs["dvc_inputs"] = dvc["outs"], dvc["deps"]
    log.info("inputs: model md5 %s, calibration text md5 %s", inputs["model_md5"][:12], inputs["text_md5"][:12])
    return inputs


def paths_read(cfg: GammaConfig) -> list[Path]:
    """The model directory, the prepared text and the user's text source where there is one: known
    before anything is converted or prepared."""
    data = Path(cfg.model.data_dir)
    model = embedded_model_dir(data) if cfg.model.path == EMBEDDED else Path(cfg.model.path).expanduser()
    source = [] if cfg.text.source == EMBEDDED else [Path(cfg.text.source).expanduser()]
    return [model, data / "text", *source]


def check_inputs(cfg: GammaConfig) -> None:
    """What can be refused from the configuration, the model's config.json and the tracking store,
    in seconds and before a flow starts (one clear line, no flow traceback)."""
    tracking.check_tracking(cfg.tracking.uri)
    Workspace(cfg).check_shapes()  # resolves the model path first: a missing one is named


def workspace(cfg: GammaConfig, inputs: dict) -> Workspace:
    """The run's workspace, shared by every task of this process, keyed on the recorded inputs."""
    return Workspace.shared(cfg, inputs["model_md5"], inputs["text_md5"])


def lineage(inputs: dict) -> dict:
    """The tags every registered score table and variant carries: content hashes, the commit and,
    in a DVC project, the md5 DVC recorded for each input it hashed."""
    out = {"model_md5": inputs["model_md5"], "text_md5": inputs["text_md5"], "git_commit": inputs["git_commit"]}
    if inputs.get("dvc_inputs"):
        out["dvc_inputs"] = json.dumps(inputs["dvc_inputs"], sort_keys=True)
    return out
