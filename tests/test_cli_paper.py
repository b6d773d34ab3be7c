"""Issue 24: `sarkern train --placeholder paper` is the paper's whole setup (its system prompt in the real prompts and
the placeholder, its training recipe), and a placeholder the trainer cannot build is bad input (exit 2)."""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("trl")

from scorer_models import plain_tokenizer  # noqa: E402

from sarkern import cli  # noqa: E402
from sarkern.cli import RECIPES, SetupError, build_trainer, parse_options  # noqa: E402
from sarkern.placeholder import PAPER_SYSTEM_PROMPT  # noqa: E402
from sarkern.tiny import TINY_MODEL_DIR  # noqa: E402

QUICK = ["--max-completion-length", "24", "--prompts-per-step", "2", "--num-problems", "16"]


def test_the_paper_recipe_is_one_switch_and_explicit_options_win(tmp_path):
    paper = parse_options(["train", "--placeholder", "paper"])
    assert (paper.scale_rewards, paper.num_generations, paper.sar_weight) == ("none", 6, 0.2)
    assert {name: getattr(paper, name) for name in RECIPES["paper"]} == RECIPES["paper"]
    assert paper.describe_recipe() == (
        "recipe 'paper' (--placeholder paper): scale_rewards='none', num_generations=6, sar_weight=0.2"
    )
    default = parse_options(["train"])
    assert (default.scale_rewards, default.num_generations, default.sar_weight) == ("group", 8, 0.2)
    # Explicit options, from the command line or a YAML file, win over the recipe and are named.
    config = tmp_path / "run.yaml"
    config.write_text("placeholder: paper\nscale_rewards: group\n", encoding="utf-8")
    mixed = parse_options(["train", "--config", str(config), "--num-generations", "4"])
    assert (mixed.scale_rewards, mixed.num_generations, mixed.sar_weight) == ("group", 4, 0.2)
    assert mixed.describe_recipe() == (
        "recipe 'paper' (--placeholder paper): sar_weight=0.2; explicit options kept: --scale-rewards 'group', "
        "--num-generations 4"
    )
    with pytest.raises(SystemExit):
        parse_options(["train", "--scale-rewards", "std"])
    # The options that define a run record the recipe's values (a resume compares them).
    assert cli.run_defining_options(paper)["scale_rewards"] == "none"


def test_build_trainer_with_the_paper_preset(tmp_path):
    paper = build_trainer(parse_options(["train", "--placeholder", "paper", "--output-dir", str(tmp_path), *QUICK]))
    assert paper.scale_rewards == "none" and paper.num_generations == 6
    first = paper.train_dataset[0]["prompt"]
    assert first[0] == {"role": "system", "content": PAPER_SYSTEM_PROMPT} and first[1]["role"] == "user"
    assert PAPER_SYSTEM_PROMPT in paper.processing_class.decode(paper.sar_scorer.placeholder_ids)
    template = build_trainer(parse_options(["train", "--output-dir", str(tmp_path / "t"), *QUICK]))
    assert template.scale_rewards == "group" and template.num_generations == 8
    assert [m["role"] for m in template.train_dataset[0]["prompt"]] == ["user"]  # the default preset stays as it is


def test_plain_text_models_get_the_official_plain_prompts_or_a_refusal(tmp_path):
    from sarkern.cli import _paper_dataset, load_model_and_tokenizer
    from sarkern.tasks import synthetic_arithmetic_dataset

    dataset = synthetic_arithmetic_dataset(4, seed=0)
    options = parse_options(["train", "--placeholder", "paper"])
    with pytest.raises(SetupError, match=r"has no chat template, .* TRL tokenizes plain-text prompts with the tok"):
        _paper_dataset(dataset, plain_tokenizer(), options)  # adds <s> to every text
    model_dir = tmp_path / "model"
    shutil.copytree(TINY_MODEL_DIR, model_dir)
    (model_dir / "chat_template.jinja").unlink()
    _, tokenizer = load_model_and_tokenizer(str(model_dir))
    assert not tokenizer.chat_template
    prompts = _paper_dataset(dataset, tokenizer, options)["prompt"]
    assert prompts[0] == f"System: {PAPER_SYSTEM_PROMPT}\nUser: {dataset[0]['prompt'][0]['content']}\nAssistant: "
    with pytest.raises(ValueError, match=r"dataset row 1: the paper's prompts are its system prompt and one question"):
        from sarkern.tasks import with_paper_prompts

        with_paper_prompts(synthetic_arithmetic_dataset(2, seed=0, system_prompt="be brief"), tokenizer)


EMPTY_USER_RAISES = (
    "{%- for m in messages %}{% if m['role'] == 'user' and not m['content'] %}"
    "{{ raise_exception('user messages must have content') }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_a_placeholder_error_while_building_the_trainer_exits_2_with_one_line(tmp_path, capsys):
    """Issue 21's leftover: with `--reward self_confidence` the placeholder is not length-checked before the trainer
    is built, so the template's refusal comes from the trainer's construction: bad input, exit 2, one line."""
    model_dir = tmp_path / "model"
    shutil.copytree(TINY_MODEL_DIR, model_dir)
    (model_dir / "chat_template.jinja").write_text(EMPTY_USER_RAISES, encoding="utf-8")
    argv = ["train", "--model", str(model_dir), "--reward", "self_confidence", "--output-dir", str(tmp_path / "o")]
    status = cli.main([*argv, "--steps=1", *QUICK, "--num-generations", "2"])
    lines = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if "sarkern" in line]
    assert status == 2 and len(lines) == 1, (status, lines)
    assert lines[0].startswith("sarkern train: error: the chat template of ")
    assert "user messages must have content" in lines[0] and "Traceback" not in lines[0]
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_sarkern_train_placeholder_paper_run(tmp_path, capsys):
    """Two steps of `sarkern train --placeholder paper --debug`: the log names the recipe, and the first prompt as
    TRL generates from it and its SAR placeholder, decoded, both carry the paper's system prompt."""
    out = tmp_path / "run"
    argv = ["train", "--placeholder", "paper", "--steps", "2", "--debug", "--output-dir", str(out), *QUICK]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "sarkern train: recipe 'paper' (--placeholder paper): scale_rewards='none', num_generations=6, " \
        "sar_weight=0.2" in lines  # fmt: skip
    prompt = next(line for line in lines if line.startswith("sarkern train: debug: prompt 1 as generated from: "))
    placeholder = next(line for line in lines if line.startswith("sarkern train: debug: its SAR placeholder (paper): "))
    system_turn = repr(f"<|im_start|>system\n{PAPER_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n")[1:-1]
    assert system_turn in prompt and system_turn in placeholder
    assert placeholder.endswith(repr("<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n")[1:])
    assert (out / "final").is_dir()


def test_a_run_recorded_before_scale_rewards_existed_still_resumes_as_trl_default(tmp_path, capsys):
    import json

    out = tmp_path / "old"
    out.mkdir()
    options = parse_options(["train", "--output-dir", str(out)])
    recorded = cli.run_defining_options(options)
    del recorded["scale_rewards"]  # what an older sarkern wrote: it trained with TRL's default scaling
    record = {"run_id": "r1", "status": "finished", "steps": options.steps, "options": recorded}
    (out / "sarkern-run.json").write_text(json.dumps(record), encoding="utf-8")
    assert cli.main(["train", "--output-dir", str(out)]) == 0
    assert "already finished" in capsys.readouterr().out
    # Asking for another scaling is a changed option, named.
    assert cli.main(["train", "--output-dir", str(out), "--scale-rewards", "none"]) == 2
    assert "--scale-rewards (recorded 'group', now 'none')" in capsys.readouterr().err
