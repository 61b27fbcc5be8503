"""The figures that the equivalence test compares across commits: a small `gamma learn`,
`gamma allocate` and `gamma quantize` on the first ``BLOCKS`` blocks of the embedded model (float32,
the same weights, given to both commits as a user's model directory), RTN and GPTQ, through the command
line that every commit has. Writes the score table, the Stage II assignments and a hash of every
exported tensor.

tests/test_equivalence.py runs this file with dd5a73c's code first on the path (taken from git
history) and compares with what this checkout gives; `tests/data/reference_dd5a73c.json`, for a
clone without that history, was written the same way:

    mkdir /tmp/old && git archive dd5a73c gamma | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old python tests/reference_run.py tests/data/reference_dd5a73c.json
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = (2.5, 3.0, 3.5)
BLOCKS = 4  # of the embedded model's 30: every code path the same, GPTQ's sequential walk 7x shorter
SETTINGS = {
    "model.data_dir": str(ROOT / "data"), "text.calibration_sequences": 4, "text.sequence_length": 64,
    "stage1.steps": 6, "stage1.sequences_per_step": 2, "stage1.tokens_per_sequence": 64,
    "stage1.extra_budgets": "[]", "quantizer.group_size": 64, "evaluation.max_tokens": 256,
    "evaluation.context_length": 64, "evaluation.zero_shot_items": 0,
}


def tensor_hashes(checkpoint: Path) -> dict[str, str]:
    """sha256 of every stored tensor; zero-points in the padded layout (one int32 row per output row,
    the packed rows first) are hashed as their packed rows, the layout every earlier commit wrote."""
    import math

    import torch
    from safetensors.torch import load_file

    bits = {t: g["weights"]["num_bits"] for g in json.loads((checkpoint / "config.json").read_text())
            ["quantization_config"]["config_groups"].values() for t in g["targets"]}
    out = {}
    for f in sorted(checkpoint.glob("*.safetensors")):
        tensors = load_file(f)
        for name, t in tensors.items():
            module = name.removesuffix(".weight_zero_point")
            if module != name:
                t = t[: math.ceil(int(tensors[f"{module}.weight_shape"][0]) * bits[module] / 32)]
            out[name] = hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()[:16]
    return out


def first_blocks(where: Path) -> Path:
    """The embedded model cut to its first ``BLOCKS`` blocks (embeddings, norm and head kept), in float32."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    embedded = ROOT / "data" / "models" / "smollm2-135m"
    config = AutoConfig.from_pretrained(embedded)
    config.num_hidden_layers = BLOCKS
    model = AutoModelForCausalLM.from_pretrained(embedded, config=config, dtype=torch.float32)
    model.save_pretrained(where)
    AutoTokenizer.from_pretrained(embedded).save_pretrained(where)
    return where


def produce(method: str, where: Path) -> dict:
    """One quantizer's score table, assignments and exported tensors, through the command line."""
    from gamma import cli

    params = where / "params.yaml"
    params.write_text("{}\n")
    model = first_blocks(where / "model")
    sets = [f"{k}={v}" for k, v in {**SETTINGS, "model.path": str(model), "quantizer.method": method,
                                    "output_dir": str(where)}.items()]
    common = ["--params", str(params)] + [a for s in sets for a in ("--set", s)]
    for argv in (["learn"], ["allocate", "--budgets", ",".join(map(str, BUDGETS))], ["quantize", "--budget", "3"]):
        code = cli.main(argv + common)
        if code not in (0, None):
            raise SystemExit(f"gamma {' '.join(argv)} exited {code}")
    table = json.loads((where / "scores.json").read_text())
    assignments = {f"{b:g}": json.loads((where / "assignments" / f"{b:g}.json").read_text())["assignment"]
                   for b in BUDGETS}
    return {"modules": table["modules"], "scores": table["scores"], "assignments": assignments,
            "tensors": tensor_hashes(where / "models" / "3")}


def main() -> None:
    out = {}
    for method in ("rtn", "gptq"):
        with tempfile.TemporaryDirectory() as tmp:
            out[method] = produce(method, Path(tmp))
    Path(sys.argv[1]).write_text(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
