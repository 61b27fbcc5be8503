"""The first task of a run: the model directory and text, versioned with DVC where the project is a
DVC repository, and the content hashes every later task records (its lineage)."""

from __future__ import annotations

from prefect import get_run_logger, task

from gamma.config import GammaConfig
from gamma.hashing import content_md5
from gamma.run.workspace import Workspace
from tasks import tracking
from tasks.versioning import dvc_root, reproduce_and_push


@task(name="prepare inputs", retries=1)
def prepare(cfg: GammaConfig, use_dvc: bool = True) -> dict:
    """Model directory and text, versioned with DVC where the project is a DVC repo; content hashes."""
    log = get_run_logger()
    root = dvc_root() if use_dvc and cfg.pipeline.dvc else None
    dvc = None
    if root is not None:
        dvc = reproduce_and_push(root)
        log.info("DVC: stage 'prepare' of %s reproduced, %s file(s) pushed to the default remote", root, dvc["pushed"])
    ws = Workspace(cfg)
    ws.check_shapes()  # a group size the model's widths refuse: before any model load or Stage I
    inputs = {"model_dir": str(ws.model_dir), "model_md5": ws.model_hash, "text_md5": ws.text_hash,
              "text_dir_md5": content_md5(ws.text.calibration.parent), "git_commit": tracking.git_commit()}
    if dvc:
        inputs["dvc_outs"] = dvc["outs"]
    log.info("inputs: model md5 %s, calibration text md5 %s", inputs["model_md5"][:12], inputs["text_md5"][:12])
    return inputs


def check_inputs(cfg: GammaConfig) -> None:
    """What can be refused from the configuration, the model's config.json and the tracking store,
    in seconds and before a flow starts (one clear line, no flow traceback)."""
    tracking.check_tracking(cfg.tracking.uri)
    Workspace(cfg).check_shapes()  # resolves the model path first: a missing one is named


def workspace(cfg: GammaConfig, inputs: dict) -> Workspace:
    """The run's workspace, shared by every task of this process, keyed on the recorded inputs."""
    return Workspace.shared(cfg, inputs["model_md5"], inputs["text_md5"])


def lineage(inputs: dict) -> dict:
    return {"model_md5": inputs["model_md5"], "text_md5": inputs["text_md5"], "git_commit": inputs["git_commit"]}
