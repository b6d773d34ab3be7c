"""`sarkern train --model` (hence SARGRPOTrainer) on tiny random Qwen3.5 and gpt-oss models: both train with SAR on
the universal path, and the run's metrics say so."""

from __future__ import annotations

import json
import math
import shutil

import pytest

pytest.importorskip("trl")

from family_zoo import zoo_model  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from sarkern.cli import parse_options, run_train  # noqa: E402
from sarkern.tiny import TINY_MODEL_DIR  # noqa: E402

QUICK = ["--max-completion-length", "16", "--prompts-per-step", "2", "--num-generations", "2", "--num-problems", "8"]


@pytest.mark.parametrize("family", ["qwen3_5", "gpt_oss"])
def test_sarkern_train_runs_sar_on_a_new_family(tmp_path, family):
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    model = zoo_model(
        family,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=0.02,
    )
    model_dir = tmp_path / family
    model.save_pretrained(model_dir)
    for name in TINY_MODEL_DIR.iterdir():  # the bundled tokenizer and its chat template
        if "token" in name.name or name.suffix == ".jinja":
            shutil.copy(name, model_dir / name.name)
    out = tmp_path / "run"
    run_train(parse_options(["train", "--model", str(model_dir), "--steps", "1", "--output-dir", str(out), *QUICK]))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step = next(row for row in rows if "sar/packed_path" in row)
    assert step["sar/packed_path"] == 0.0  # the universal path ran
    sar = [value for key, value in step.items() if key.startswith("rewards/sar") and key.endswith("/mean")]
    assert sar and all(math.isfinite(v) for v in sar), step
