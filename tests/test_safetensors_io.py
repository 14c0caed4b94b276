"""`lmjax.hf.safetensors_io`: reading and writing Hugging Face safetensors weights.

The references are independent: `safetensors.torch.load_file` reads what we write, and transformers
both writes checkpoints we read (`save_pretrained`) and loads ones we write (`from_pretrained`).
"""

from __future__ import annotations

import json
import re
import struct

import ml_dtypes
import numpy as np
import pytest

import torch  # noqa: E402  (the test extra; CI installs it: a missing install must fail, not skip)
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file as torch_load_file  # noqa: E402

from lmjax.errors import CheckpointError  # noqa: E402
from lmjax.hf.safetensors_io import SafetensorsCheckpoint, write_safetensors  # noqa: E402


def _bits(a) -> np.ndarray:
    """The raw bits of a numpy array or torch tensor, so NaN payloads and -0.0 compare exactly."""
    if isinstance(a, torch.Tensor):
        a = a.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()])
        a = a.numpy()
    return np.ascontiguousarray(a).view(f"u{a.dtype.itemsize}")


def _sample_tensors():
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal((5, 7)).astype(np.float32)
    f32[0, :3] = [np.nan, -0.0, np.inf]
    return {
        "f32": f32,
        "f16": rng.standard_normal((3, 4)).astype(np.float16),
        "bf16": rng.standard_normal((4, 6)).astype(ml_dtypes.bfloat16),
        # save_file copies nbytes from the data pointer ignoring strides: these catch a missing fix.
        "f32_transposed": f32.T,
        "f32_big_endian": rng.standard_normal((2, 3)).astype(">f4"),
        "scalar": np.array(1.5, np.float32),
        "i64": np.arange(-3, 3, dtype=np.int64), "i32": np.arange(4, dtype=np.int32).reshape(2, 2),
        "i16": np.array([-7, 7], np.int16), "i8": np.array([-128, 127], np.int8),
        "u8": np.array([0, 255], np.uint8), "bool": np.array([True, False, True]), "f64": np.array([np.pi]),
    }


def test_round_trip_is_bit_identical_with_the_reference_reader(tmp_path):
    tensors = _sample_tensors()
    paths = write_safetensors(tmp_path, iter(tensors.items()))
    assert paths == [tmp_path / "model.safetensors"]
    with safe_open(str(paths[0]), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
    reference = torch_load_file(str(paths[0]))
    assert set(reference) == set(tensors)
    with SafetensorsCheckpoint.open(tmp_path) as ckpt:
        assert ckpt.names() == sorted(tensors)
        for name, want in tensors.items():
            native = want.astype(want.dtype.newbyteorder("="))
            assert tuple(reference[name].shape) == want.shape, name
            np.testing.assert_array_equal(_bits(reference[name]), _bits(native), err_msg=name)
            got = ckpt.read(name)
            assert got.dtype == native.dtype == ckpt.dtype(name) and ckpt.shape(name) == want.shape, name
            np.testing.assert_array_equal(_bits(got), _bits(native), err_msg=name)
        assert ckpt.dtype("bf16") == np.dtype(ml_dtypes.bfloat16)
        assert reference["bf16"].dtype == torch.bfloat16
        # Each read is a fresh copy from disk: changing one does not change the next.
        ckpt.read("f32")[:] = 0
        assert ckpt.read("f32")[1, 1] == tensors["f32"][1, 1]


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).eval()


def _logits(model):
    with torch.no_grad():
        return model(torch.arange(10).reshape(1, 10) % 64).logits


def test_sharded_write_loads_in_transformers_with_identical_logits(tmp_path, tiny_llama):
    state = {k: v.detach().numpy() for k, v in tiny_llama.state_dict().items()}
    max_bytes = 20_000
    paths = write_safetensors(tmp_path, ((k, v) for k, v in state.items()), max_shard_bytes=max_bytes)
    shards, index_path = paths[:-1], paths[-1]
    n = len(shards)
    assert n > 2 and index_path.name == "model.safetensors.index.json"
    assert [p.name for p in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)  # no temporaries left
    index = json.loads(index_path.read_text())
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in state.values())
    assert set(index["weight_map"]) == set(state)
    for shard in shards:
        held = torch_load_file(str(shard))
        size = sum(t.numel() * t.element_size() for t in held.values())
        assert size <= max_bytes or len(held) == 1
        assert all(index["weight_map"][k] == shard.name for k in held)

    tiny_llama.config.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(loaded), _logits(tiny_llama))


@pytest.mark.parametrize("max_shard_size", ["20KB", None])
def test_reads_what_transformers_save_pretrained_writes(tmp_path, tiny_llama, max_shard_size):
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    tiny_llama.save_pretrained(tmp_path, **kwargs)
    sharded = (tmp_path / "model.safetensors.index.json").exists()
    assert sharded == (max_shard_size is not None)
    state = tiny_llama.state_dict()
    with SafetensorsCheckpoint.open(tmp_path) as ckpt:
        assert ckpt.names() == sorted(state)
        ckpt.check({k: tuple(v.shape) for k, v in state.items()})
        for name, want in state.items():
            assert name in ckpt and ckpt.shape(name) == tuple(want.shape)
            np.testing.assert_array_equal(ckpt.read(name), want.detach().numpy(), err_msg=name)


def _one_line_error(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(CheckpointError, match=match) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_refuses_a_pickle_only_directory_without_unpickling(tmp_path, monkeypatch):
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    import pickle

    def no_unpickling(*a, **k):
        raise AssertionError("lmjax must never unpickle")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(torch, "load", no_unpickling)
    message = _one_line_error("pytorch_model.bin", SafetensorsCheckpoint.open, tmp_path)
    assert "safetensors only" in message and "runs its code" in message
    assert f"from_pretrained('{tmp_path}')" in message and "save_pretrained(" in message


def test_refuses_a_directory_without_weights(tmp_path):
    _one_line_error(re.escape(f"{tmp_path}: no model.safetensors or model.safetensors.index.json"),
                    SafetensorsCheckpoint.open, tmp_path)


@pytest.mark.parametrize("damage", ["cut_last_10_bytes", "cut_into_header", "garbage", "trailing_bytes"])
def test_refuses_a_truncated_or_corrupt_file_at_open(tmp_path, damage):
    (path,) = write_safetensors(tmp_path, [("a", np.ones((4, 4), np.float32)), ("b", np.zeros(8, np.float32))])
    data = path.read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    path.write_bytes({"cut_last_10_bytes": data[:-10], "cut_into_header": data[: 8 + header_len // 2],
                      "garbage": b"not a safetensors file at all", "trailing_bytes": data + b"\0" * 16}[damage])
    _one_line_error(re.escape(f"{path}: truncated or not a safetensors file"), SafetensorsCheckpoint.open, tmp_path)


def _sharded(tmp_path):
    return write_safetensors(tmp_path, [(f"t{i}", np.full((16,), i, np.float32)) for i in range(4)],
                             max_shard_bytes=64)


def test_refuses_an_index_naming_a_missing_shard(tmp_path):
    paths = _sharded(tmp_path)
    paths[1].unlink()
    _one_line_error(rf"model\.safetensors\.index\.json: lists shard file '{paths[1].name}', which does not exist",
                    SafetensorsCheckpoint.open, tmp_path)


def test_refuses_an_index_listing_a_tensor_its_file_lacks(tmp_path):
    paths = _sharded(tmp_path)
    index = json.loads(paths[-1].read_text())
    index["weight_map"]["ghost"] = paths[0].name
    paths[-1].write_text(json.dumps(index))
    _one_line_error(re.escape(f"{paths[0]}: has no tensor 'ghost'"), SafetensorsCheckpoint.open, tmp_path)


def test_refuses_a_shard_holding_a_tensor_the_index_does_not_list(tmp_path):
    paths = write_safetensors(tmp_path, [(f"t{i}", np.zeros(16, np.float32)) for i in range(4)], max_shard_bytes=128)
    index = json.loads(paths[-1].read_text())
    assert index["weight_map"]["t0"] == index["weight_map"]["t1"] == paths[0].name
    del index["weight_map"]["t1"]
    paths[-1].write_text(json.dumps(index))
    _one_line_error(re.escape(f"{paths[0]}: holds tensor 't1', which model.safetensors.index.json does not list"),
                    SafetensorsCheckpoint.open, tmp_path)


def test_refuses_an_index_pointing_outside_the_directory(tmp_path):
    paths = _sharded(tmp_path)
    index = json.loads(paths[-1].read_text())
    index["weight_map"]["t0"] = "../elsewhere.safetensors"
    paths[-1].write_text(json.dumps(index))
    _one_line_error("expected a file name in the same directory", SafetensorsCheckpoint.open, tmp_path)


def test_check_names_a_missing_an_extra_or_a_misshapen_tensor(tmp_path):
    write_safetensors(tmp_path, [("a", np.zeros((2, 3), np.float32)), ("b", np.zeros(4, np.float32))])
    file = tmp_path / "model.safetensors"
    with SafetensorsCheckpoint.open(tmp_path) as ckpt:
        ckpt.check({"a": (2, 3), "b": (4,)})
        ckpt.check({"a": (2, 3), "b": (4,), "c": (1,)}, optional={"c"})
        _one_line_error(re.escape(f"{tmp_path}: missing tensor 'c' (expected shape (1,))"),
                        ckpt.check, {"a": (2, 3), "b": (4,), "c": (1,)})
        _one_line_error(re.escape(f"{file}: unexpected tensor 'b'"), ckpt.check, {"a": (2, 3)})
        _one_line_error(re.escape(f"{file}: tensor 'a' has shape (2, 3), expected (3, 2)"),
                        ckpt.check, {"a": (3, 2), "b": (4,)})
        message = _one_line_error("missing tensor 'c'", ckpt.check, {"a": (3, 2), "c": (1,)})
        assert message.endswith("(and 2 more problems)")


def test_write_refuses_a_directory_that_already_holds_weights(tmp_path):
    write_safetensors(tmp_path, [("a", np.ones(3, np.float32))])
    before = (tmp_path / "model.safetensors").read_bytes()
    _one_line_error(re.escape(f"{tmp_path}: already holds model.safetensors"),
                    write_safetensors, tmp_path, [("a", np.zeros(3, np.float32))])
    assert (tmp_path / "model.safetensors").read_bytes() == before


def test_an_interrupted_write_leaves_no_safetensors(tmp_path):
    def tensors():
        for i in range(3):
            yield f"t{i}", np.zeros(16, np.float32)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_safetensors(tmp_path, tensors(), max_shard_bytes=64)
    assert list(tmp_path.iterdir()) == []


def test_write_refuses_unsupported_dtypes_and_duplicate_names(tmp_path):
    _one_line_error("tensor 'c': dtype complex64", write_safetensors, tmp_path / "a",
                    [("c", np.zeros(2, np.complex64))])
    _one_line_error("tensor 'x' twice", write_safetensors, tmp_path / "b",
                    [("x", np.zeros(2, np.float32)), ("x", np.zeros(2, np.float32))])
    assert not list(tmp_path.glob("*/*"))
