"""Hugging Face interop from the command line: `lmjax import-hf`, `export-hf`, `train.init_from` of a
Hugging Face directory and `load_model`, checked against `transformers` on tiny random models.

The models here are tiny LLaMA / GPT-2 decoders (d_model 32-64, 2 layers) whose vocabulary is the
sentencepiece model the tiny lmjax config trains, so every command runs on text in seconds.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

import torch  # noqa: E402  (the test extra; CI installs it: a missing install must fail, not skip)
import transformers  # noqa: E402
import safetensors.torch as safetensors_torch  # noqa: E402

from flax import linen as nn  # noqa: E402

from lmjax import load_model  # noqa: E402
from lmjax.cli import main  # noqa: E402
from lmjax.config import ConfigError, load_config  # noqa: E402
from lmjax.data.tokenizer import load_tokenizer  # noqa: E402
from lmjax.train.init_from import load_source_params  # noqa: E402
from lmjax.train.loop import train  # noqa: E402
from lmjax.train.step import ModelSetup  # noqa: E402

# lmjax's sentencepiece ids (lmjax/data/tokenizer.py): written into the Hugging Face configs so that
# transformers' generate stops (and pads) where lmjax does.
PAD, BOS, EOS = 0, 2, 3
NOISE = ("read_only", "orbax", "warning")  # library notices that must not reach a user's terminal


def _no_noise(text: str) -> None:
    noisy = [line for line in text.splitlines() if any(word in line.lower() for word in NOISE)]
    assert not noisy, noisy


def _one_error_line(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def _files(root: Path) -> dict[str, bytes]:
    """Every file under `root` (relative path -> bytes), directories included as markers."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(root.rglob("*"))}


def _data_overrides(tiny_overrides: list[str]) -> list[str]:
    """The tiny run's data, optimizer and train settings, without its model (a source gives that)."""
    return [o for o in tiny_overrides if not o.startswith("model.")]


def _eval_overrides(tiny_overrides: list[str]) -> list[str]:
    """The tiny data slice for `lmjax eval` of an imported run (whose config has the default data)."""
    return [o for o in tiny_overrides if o.startswith("data.")] + ["train.eval_batches=1"]


def _llama_config(vocab: int, **kwargs) -> "transformers.LlamaConfig":
    return transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
        tie_word_embeddings=False, **kwargs,
    )


def _gpt2_config(**kwargs) -> "transformers.GPT2Config":
    return transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0,
                                   eos_token_id=0, **kwargs)


def _save(model, directory: Path) -> Path:
    model.save_pretrained(directory)
    return directory


def _torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()


def _quiet_main(argv: list[str]) -> tuple[int, str]:
    """main(argv) with its stdout captured in Python (for fixtures, which have no capfd)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(argv)
    return rc, out.getvalue()


# ----------------------------------------------------------------------------- module fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf_cli")


@pytest.fixture(scope="module")
def trained_run(work, tiny_overrides) -> Path:
    """The tiny lmjax config (dense, llama style) trained 2 steps: a run directory and its tokenizer.
    On the default mesh (all devices): export-hf loads a run on its saved mesh and takes no mesh
    overrides, so a run saved with mesh.data=1 could not be exported in this 8-device process."""
    run_dir = work / "trained"
    train(load_config(None, tiny_overrides + [f"run_dir={run_dir}", "train.steps=2", "train.checkpoint_every=2"]))
    return run_dir


@pytest.fixture(scope="module")
def vocab(trained_run) -> int:
    return load_tokenizer(trained_run / "tokenizer.model").vocab_size


@pytest.fixture(scope="module")
def llama_hf(work, trained_run, vocab) -> Path:
    """A random transformers LLaMA over the tiny config's sentencepiece vocabulary, with that model as tokenizer.model."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_llama_config(vocab)).eval()
    hf_dir = _save(model, work / "llama_hf")
    shutil.copyfile(trained_run / "tokenizer.model", hf_dir / "tokenizer.model")
    return hf_dir


@pytest.fixture(scope="module")
def llama_torch(llama_hf):
    return transformers.LlamaForCausalLM.from_pretrained(llama_hf, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def imported_llama(work, llama_hf) -> tuple[Path, str]:
    """(the run directory `lmjax import-hf` writes from llama_hf, what it printed)."""
    run_dir = work / "llama_run"
    rc, printed = _quiet_main(["import-hf", str(llama_hf), "--out", str(run_dir)])
    assert rc == 0
    return run_dir, printed


@pytest.fixture(scope="module")
def gpt2_hf(work) -> Path:
    torch.manual_seed(1)
    return _save(transformers.GPT2LMHeadModel(_gpt2_config()).eval(), work / "gpt2_hf")


# ----------------------------------------------------------------------------- 1. tokenizer comes along


def test_import_hf_brings_the_tokenizer_and_generates_and_evaluates(imported_llama, llama_hf, llama_torch, vocab, tiny_overrides, capfd):
    run_dir, printed = imported_llama
    assert "LlamaForCausalLM" in printed and str(run_dir) in printed
    assert "tokenizer: sentencepiece model tokenizer.model" in printed
    assert (run_dir / "tokenizer.model").read_bytes() == (llama_hf / "tokenizer.model").read_bytes()
    record = json.loads((run_dir / "imported.json").read_text())
    assert (record["tokenizer"], record["model_type"], record["dtype"]) == ("tokenizer.model", "llama", "float32")
    assert (record["bos_token_id"], record["eos_token_id"], record["pad_token_id"]) == (BOS, EOS, PAD)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (saved["model"]["vocab_size"], saved["model"]["d_model"], saved["model"]["n_layers"]) == (vocab, 64, 2)
    assert saved["data"]["tokenizer"]["path"] == str(run_dir / "tokenizer.model")

    # generate: greedy, the prompt encoded as lmjax encodes it (sentencepiece ids, no BOS added).
    capfd.readouterr()
    assert main(["generate", str(run_dir), "--prompt", "def ", "--max-new-tokens", "5"]) == 0
    out, err = capfd.readouterr()
    tokenizer = load_tokenizer(run_dir / "tokenizer.model")
    prompt_ids = tokenizer.encode("def ")
    assert prompt_ids and prompt_ids[0] != tokenizer.bos_id
    with torch.no_grad():
        generated = llama_torch.generate(
            input_ids=torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=5, do_sample=False, eos_token_id=EOS, pad_token_id=PAD,
        )[0, len(prompt_ids):].tolist()
    assert len(generated) == 5 and EOS not in generated  # the seed gives 5 real tokens: the comparison means something
    assert out == "def " + tokenizer.decode(generated) + "\n"
    _no_noise(out + err)

    # eval on the tiny data slice: one JSON line on stdout.
    assert main(["eval", str(run_dir), *_eval_overrides(tiny_overrides)]) == 0
    out, err = capfd.readouterr()
    assert out.count("\n") == 1, out
    metrics = json.loads(out)
    assert math.isfinite(metrics["eval_loss"]) and metrics["step"] == 0
    # A random model over V tokens: about ln(V) nats per token.
    assert abs(metrics["eval_loss"] - math.log(vocab)) < 0.5
    _no_noise(out + err)


# ----------------------------------------------------------------------------- 2. no sentencepiece model


def test_import_without_sentencepiece_model_says_so_and_generate_and_init_from_refuse(gpt2_hf, work, tiny_overrides, capfd):
    run_dir = work / "gpt2_run"
    capfd.readouterr()
    assert main(["import-hf", str(gpt2_hf), "--out", str(run_dir)]) == 0
    out, err = capfd.readouterr()
    assert "GPT2LMHeadModel" in out
    assert "tokenizer:" in out and "no sentencepiece model" in out
    _no_noise(out + err)
    record = json.loads((run_dir / "imported.json").read_text())
    assert record["tokenizer"] is None and record["model_type"] == "gpt2"
    assert not (run_dir / "tokenizer.model").exists()

    # The imported weights compute transformers' logits (GPT-2: learned positions, tied head, biases).
    ids = np.random.default_rng(0).integers(0, 100, (2, 12))
    want = _torch_logits(transformers.GPT2LMHeadModel.from_pretrained(gpt2_hf).eval(), ids)
    np.testing.assert_allclose(np.asarray(load_model(run_dir).logits(ids)), want, atol=1e-4)
    capfd.readouterr()

    assert main(["generate", str(run_dir), "--prompt", "x"]) == 2
    out, err = capfd.readouterr()
    assert out == ""
    assert "tokenizer" in _one_error_line(err)

    base = _data_overrides(tiny_overrides) + [f"run_dir={work / 'never'}"]
    with pytest.raises(ConfigError, match="has no sentencepiece model") as raised:
        load_config(None, base + [f"train.init_from={gpt2_hf}"])
    assert "\n" not in str(raised.value) and str(gpt2_hf) in str(raised.value)
    # Its imported run directory is refused the same way, with the import's note.
    with pytest.raises(ConfigError, match="imported by lmjax import-hf.*has no tokenizer.model") as raised:
        load_config(None, base + [f"train.init_from={run_dir}"])
    assert "\n" not in str(raised.value)
    assert not (work / "never").exists()


# ----------------------------------------------------------------------------- 3. train.init_from=HF_DIR


def _packed_cross_entropy(model, batch: dict) -> float:
    """transformers' mean next-token loss over a packed lmjax batch: every document of every row is
    its own sequence (lmjax's segment ids and restarting positions), its targets masked by loss_mask."""
    total = count = 0.0
    for b in range(batch["tokens"].shape[0]):
        segments = batch["segment_ids"][b]
        for segment in np.unique(segments[segments > 0]):
            cols = np.flatnonzero(segments == segment)
            assert np.all(np.diff(cols) == 1)
            with torch.no_grad():
                logits = model(input_ids=torch.as_tensor(batch["tokens"][b, cols][None], dtype=torch.long),
                               position_ids=torch.as_tensor(batch["positions"][b, cols][None], dtype=torch.long)).logits[0]
            ce = torch.nn.functional.cross_entropy(logits.double(), torch.as_tensor(batch["targets"][b, cols], dtype=torch.long),
                                                   reduction="none").numpy()
            mask = batch["loss_mask"][b, cols].astype(np.float64)
            total, count = total + float(np.sum(ce * mask)), count + float(mask.sum())
    return total / count


def test_init_from_hf_dir_takes_its_model_tokenizer_and_weights(llama_hf, llama_torch, work, vocab, tiny_overrides):
    run_dir = work / "from_hf"
    cfg = load_config(None, _data_overrides(tiny_overrides) + [
        f"run_dir={run_dir}", f"train.init_from={llama_hf}", "train.steps=2", "train.checkpoint_every=2", "mesh.data=1"])
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.vocab_size, cfg.model.kv_heads) == (64, 2, vocab, 2)
    assert cfg.model.tie_embeddings is False and cfg.data.tokenizer.path == str(llama_hf / "tokenizer.model")

    # The source parameters, read by hand from the safetensors for one tensor.
    setup = ModelSetup.build(cfg, jax.devices()[:1])
    params, step = load_source_params(cfg, setup)
    params = nn.unbox(params)
    assert step == 0
    tensors = safetensors_torch.load_file(llama_hf / "model.safetensors")
    q_proj = tensors["model.layers.0.self_attn.q_proj.weight"].numpy()  # [heads * head_dim, d_model]
    np.testing.assert_array_equal(np.asarray(params["layers"]["attention"]["query"]["kernel"][0]), q_proj.T.reshape(64, 4, 16))
    np.testing.assert_array_equal(np.asarray(params["embed"]["embedding"]), tensors["model.embed_tokens.weight"].numpy())

    # The first batch, as the trainer draws it (a fresh run: the iterator's first batch).
    data = setup.task.build_data(cfg)
    iterator = data.train_iterator(0, 1)
    try:
        first = {key: np.asarray(value) for key, value in next(iterator).items()}
    finally:
        iterator.close()
    want = _packed_cross_entropy(llama_torch, first)

    summary = train(cfg, devices=jax.devices()[:1])
    assert (summary["init_from"], summary["init_from_step"]) == (str(llama_hf), 0)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]
    assert (saved["d_model"], saved["n_layers"], saved["vocab_size"], saved["n_heads"], saved["d_ff"]) == (64, 2, vocab, 4, 128)
    assert (run_dir / "tokenizer.model").read_bytes() == (llama_hf / "tokenizer.model").read_bytes()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step_one = next(r for r in records if r.get("step") == 1 and "loss" in r)
    assert step_one["loss"] == pytest.approx(want, abs=2e-5)


# ----------------------------------------------------------------------------- 4. train on an imported run


def test_train_on_an_imported_run_refuses_and_changes_nothing(imported_llama, capfd):
    run_dir, _ = imported_llama
    before = _files(run_dir)
    capfd.readouterr()
    assert main(["train", str(run_dir)]) == 2
    out, err = capfd.readouterr()
    line = _one_error_line(err)
    assert "import-hf" in line and "train.init_from" in line
    assert _files(run_dir) == before


# ----------------------------------------------------------------------------- 5. import-hf refusals


def _resave(hf_dir: Path, change) -> None:
    """Rewrites hf_dir/model.safetensors with `change(tensors)` applied."""
    path = hf_dir / "model.safetensors"
    tensors = safetensors_torch.load_file(path)
    change(tensors)
    safetensors_torch.save_file(tensors, path, metadata={"format": "pt"})


def _llama_copy(llama_hf: Path, tmp: Path) -> Path:
    hf_dir = tmp / "hf"
    shutil.copytree(llama_hf, hf_dir)
    return hf_dir


def case_pickled_weights(llama_hf, tmp, vocab):
    hf_dir = tmp / "hf"
    hf_dir.mkdir()
    shutil.copyfile(llama_hf / "config.json", hf_dir / "config.json")
    state = safetensors_torch.load_file(llama_hf / "model.safetensors")
    torch.save(state, hf_dir / "pytorch_model.bin")
    return hf_dir, ("pytorch_model.bin", "safetensors", "convert")


def case_wrong_shape(llama_hf, tmp, vocab):
    hf_dir = _llama_copy(llama_hf, tmp)
    _resave(hf_dir, lambda t: t.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(127, 64)}))
    return hf_dir, ("'model.layers.1.mlp.up_proj.weight'", "(127, 64)", "(128, 64)")


def case_missing_tensor(llama_hf, tmp, vocab):
    hf_dir = _llama_copy(llama_hf, tmp)
    _resave(hf_dir, lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"))
    return hf_dir, ("missing tensor 'model.layers.0.self_attn.k_proj.weight'",)


def case_truncated_file(llama_hf, tmp, vocab):
    hf_dir = _llama_copy(llama_hf, tmp)
    path = hf_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    return hf_dir, ("model.safetensors", "truncated")


def case_attention_bias(llama_hf, tmp, vocab):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_llama_config(vocab, attention_bias=True))
    return _save(model, tmp / "hf"), ("attention_bias=True",)


def case_gpt2_inverse_layer_scaling(llama_hf, tmp, vocab):
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(_gpt2_config(scale_attn_by_inverse_layer_idx=True))
    return _save(model, tmp / "hf"), ("scale_attn_by_inverse_layer_idx=True",)


def case_yarn_rope(llama_hf, tmp, vocab):
    hf_dir = _llama_copy(llama_hf, tmp)
    config = json.loads((hf_dir / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0, "original_max_position_embeddings": 128}
    (hf_dir / "config.json").write_text(json.dumps(config))
    return hf_dir, ("rope_type", "'yarn'")


REFUSALS = [case_pickled_weights, case_wrong_shape, case_missing_tensor, case_truncated_file, case_attention_bias,
            case_gpt2_inverse_layer_scaling, case_yarn_rope]


@pytest.mark.parametrize("case", REFUSALS, ids=[c.__name__.removeprefix("case_") for c in REFUSALS])
def test_import_hf_refuses_in_one_line_and_writes_nothing(case, llama_hf, vocab, tmp_path, capfd):
    hf_dir, expected = case(llama_hf, tmp_path, vocab)
    out_dir = tmp_path / "run"
    given_empty = case in (case_truncated_file, case_yarn_rope)  # an empty --out is allowed, and stays empty
    if given_empty:
        out_dir.mkdir()
    capfd.readouterr()
    assert main(["import-hf", str(hf_dir), "--out", str(out_dir)]) == 2
    out, err = capfd.readouterr()
    line = _one_error_line(err)
    for text in expected:
        assert text in line, line
    assert out == ""
    if given_empty:
        assert list(out_dir.iterdir()) == []
    else:
        assert not out_dir.exists()


def test_import_hf_refuses_a_non_empty_out(llama_hf, tmp_path, capfd):
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("keep me\n")
    before = _files(out_dir)
    capfd.readouterr()
    assert main(["import-hf", str(llama_hf), "--out", str(out_dir)]) == 2
    out, err = capfd.readouterr()
    assert "not empty" in _one_error_line(err) and out == ""
    assert _files(out_dir) == before


# ----------------------------------------------------------------------------- 6. export-hf


def test_export_hf_refuses_a_non_empty_out(trained_run, tmp_path, capfd):
    out_dir = tmp_path / "hf"
    out_dir.mkdir()
    (out_dir / "config.json").write_text("{}\n")
    before = _files(out_dir)
    capfd.readouterr()
    assert main(["export-hf", str(trained_run), "--out", str(out_dir)]) == 2
    out, err = capfd.readouterr()
    assert "not empty" in _one_error_line(err) and out == ""
    assert _files(out_dir) == before


def test_export_hf_bfloat16_loads_in_transformers_close_to_float32(imported_llama, llama_hf, llama_torch, vocab, tmp_path, capfd):
    from safetensors import safe_open

    run_dir, _ = imported_llama
    out_dir = tmp_path / "bf16"
    capfd.readouterr()
    assert main(["export-hf", str(run_dir), "--out", str(out_dir), "--dtype", "bfloat16"]) == 0
    out, err = capfd.readouterr()
    _no_noise(out + err)
    config = json.loads((out_dir / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and (config["bos_token_id"], config["eos_token_id"]) == (BOS, EOS)
    assert (out_dir / "tokenizer.model").read_bytes() == (llama_hf / "tokenizer.model").read_bytes()
    source = safetensors_torch.load_file(llama_hf / "model.safetensors")
    with safe_open(str(out_dir / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(source)
        for name in f.keys():
            tensor = f.get_tensor(name)
            assert tensor.dtype == torch.bfloat16, name
            assert torch.equal(tensor, source[name].to(torch.bfloat16)), name  # round to nearest, nothing else

    model = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    assert next(model.parameters()).dtype == torch.bfloat16
    ids = np.random.default_rng(1).integers(0, vocab, (2, 16))
    got = _torch_logits(model.float(), ids)
    np.testing.assert_allclose(got, _torch_logits(llama_torch, ids), atol=0.05)


def test_export_hf_of_a_trained_run_gives_transformers_the_same_logits(trained_run, vocab, tmp_path, capfd):
    out_dir = tmp_path / "hf"
    capfd.readouterr()
    assert main(["export-hf", str(trained_run), "--out", str(out_dir)]) == 0
    out, err = capfd.readouterr()
    _no_noise(out + err)
    config = json.loads((out_dir / "config.json").read_text())
    assert (config["model_type"], config["vocab_size"]) == ("llama", 512)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (BOS, EOS, PAD)
    assert (out_dir / "tokenizer.model").read_bytes() == (trained_run / "tokenizer.model").read_bytes()

    model = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    ids = np.random.default_rng(2).integers(0, vocab, (2, 16))
    want = np.asarray(load_model(trained_run).logits(ids))
    np.testing.assert_allclose(_torch_logits(model, ids), want, atol=1e-4)


# ----------------------------------------------------------------------------- 7. load_model is quiet


def test_load_model_prints_nothing(trained_run, llama_hf, llama_torch, vocab, capfd):
    capfd.readouterr()
    from_run = load_model(trained_run)
    from_hf = load_model(llama_hf)
    out, err = capfd.readouterr()
    assert out == ""
    _no_noise(err)
    assert from_run.tokenizer_path == trained_run / "tokenizer.model"
    assert from_hf.tokenizer_path == llama_hf / "tokenizer.model"
    ids = np.random.default_rng(3).integers(0, vocab, (2, 10))
    np.testing.assert_allclose(np.asarray(from_hf.logits(ids)), _torch_logits(llama_torch, ids), atol=1e-4)
