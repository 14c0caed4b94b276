"""Rewards and `lmjax data preferences`: sampling a chat run, ranking by a reward, DPO records."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from lmjax.cli import main
from lmjax.config import load_config
from lmjax.preferences import Sampler, preference_pairs, Completion
from lmjax.errors import UserError
from lmjax.rewards import REWARDS, get_reward, python_syntax, reward
from lmjax.train.loop import train


def test_python_syntax_rewards_parsing_and_a_little_length():
    prompt = 'def f(x):\n    """Double x."""\n'
    assert python_syntax(prompt, "    return 2 * x\n") == pytest.approx(1 + 0.1 * len("return2*x") / 100)
    assert python_syntax(prompt, "") == 1.0  # a docstring alone is a valid body ...
    assert python_syntax(prompt, "    return (x\n") == pytest.approx(0.1 * len("return(x") / 100)
    assert python_syntax(prompt, "    y = x\n" * 50) == pytest.approx(1.1)  # ... the length term is capped
    assert python_syntax("def f(x):\n", "") == 0.0  # no body at all does not parse
    # Rewards are a registry: a new one is a decorated function.
    reward("test_length")(lambda p, c: float(len(c)))
    records, stats = preference_pairs(["a:1", "a:2"], ["p", "q"], [[Completion("x", ()), Completion("xyz", ())], [Completion("ab", ())] * 2],
                                      "test_length")
    assert records == [{"prompt": "p", "chosen": "xyz", "rejected": "x", "reward_chosen": 3.0, "reward_rejected": 1.0, "source": "a:1"}]
    assert stats == {"prompts": 2, "samples": 4, "mean_reward": 2.0, "pairs": 1}
    del REWARDS["test_length"]
    # ... or any importable function, named module:function.
    assert get_reward("lmjax.rewards:python_syntax") is python_syntax
    with pytest.raises(UserError, match=r"--reward lmjax.rewards:nope: cannot import it"):
        get_reward("lmjax.rewards:nope")


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, tiny_overrides):
    folder = tmp_path_factory.mktemp("prefs")
    records = [{"prompt": f'def add_{i}(x):\n    """Return x plus {i}."""\n', "response": f"    return x + {i}\n"} for i in range(200)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    overrides = [o for o in tiny_overrides if not o.startswith("data.max_documents")]
    run_dir = folder / "sft"
    train(load_config(None, overrides + ["train.objective=sft", f"data.paths=[{folder / 'train.jsonl'}]", f"run_dir={run_dir}",
                                         "data.seq_len=64", "train.steps=30", "optim.lr=1e-2", "mesh.data=1"]),
          devices=jax.devices()[:1])
    return run_dir, folder / "train.jsonl"


def test_preferences_command_samples_ranks_and_writes_dpo_records(chat_run, tmp_path, capsys):
    run_dir, prompts = chat_run
    out = tmp_path / "prefs.jsonl"
    args = ["data", "preferences", str(run_dir), "--prompts", str(prompts), "--reward", "python_syntax", "--out", str(out),
            "--samples", "4", "--max-prompts", "12", "--max-new-tokens", "24"]
    assert main(args) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records and "pairs from 12 prompts x 4 samples" in capsys.readouterr().out
    prompt_texts = [json.loads(line)["prompt"] for line in prompts.read_text().splitlines()[:12]]
    for record in records:
        assert record["prompt"] in prompt_texts
        assert record["reward_chosen"] > record["reward_rejected"]
        assert record["reward_chosen"] == python_syntax(record["prompt"], record["chosen"])
        assert record["reward_rejected"] == python_syntax(record["prompt"], record["rejected"])
    # The same seed gives the same file; an existing output is never overwritten without --force.
    first = out.read_text()
    assert main(args) == 2 and "exists; pass --force" in capsys.readouterr().err
    assert main(args + ["--force"]) == 0 and out.read_text() == first
    assert main(args[:-6] + ["--reward", "nope", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "--reward: expected one of" in capsys.readouterr().err


def test_completion_logps_equal_the_models_token_log_probabilities(chat_run):
    run_dir, _ = chat_run
    sampler = Sampler.load(run_dir)
    prompts = ['def f(x):\n    """Return x."""\n', "def g():\n"]
    completions = [options[0] for options in sampler.sample(prompts, 1, 10, temperature=1.0, seed=3)]
    got = sampler.completion_logps(prompts, completions)
    for prompt, completion, value in zip(prompts, completions, got):
        prompt_ids, ids = sampler.prompt_ids(prompt), list(completion.ids)
        tokens = np.asarray([prompt_ids + ids], np.int32)
        logits = np.asarray(sampler.run.model.apply({"params": sampler.run.params}, tokens), np.float64)[0]
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        expected = sum(logp[len(prompt_ids) - 1 + t, token] for t, token in enumerate(ids))
        assert value == pytest.approx(expected, rel=1e-4)
        # The sampled ids stop at the chat's end-of-turn (or run to the token limit), and the text is theirs.
        assert completion.ids[-1] == sampler.stop_id or len(completion.ids) == 10
        assert completion.text == sampler.template.response_text(list(completion.ids))


def test_lmjax_generate_answers_a_chat_runs_prompt_as_a_user_turn(chat_run, capsys):
    run_dir, _ = chat_run
    prompt = 'def add_3(x):\n    """Return x plus 3."""\n'
    assert main(["generate", str(run_dir), "--prompt", prompt, "--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr().out
    greedy = Sampler.load(run_dir).sample([prompt], 1, 12, temperature=0.0)[0][0]
    assert greedy.text and greedy.text in printed and prompt not in printed  # the answer alone, as the chat template ends it
