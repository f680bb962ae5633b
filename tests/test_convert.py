"""python -m harness.convert: RWKV-LM <-> FLA directory <-> harness checkpoint, the harness checkpoint format."""

import json
from pathlib import Path

import pytest
import torch
from helpers import FLA, assert_process_user_error, assert_user_error, needs_fla, perturb, run_module
from safetensors.torch import load_file, save_file

import impls
from harness.convert.cli import main
from harness.model.checkpoint import CheckpointError, load_checkpoint, load_model_state, save_model
from harness.model.init import apply_init, rwkv_lm_state_dict
from harness.model.rwkv import RWKV, ModelConfig
from impls.base import LAYER0_UNUSED
from impls.fla_names import FLA_ATT_NAME_MAP
from impls.init import value_residual_init

L, C, N, V = 3, 128, 64, 1000
CFG = ModelConfig(n_layer=L, n_embd=C, head_size=N, vocab_size=V)
LAYER0_UNUSED_NAMES = {f"blocks.0.att.{n}" for n in LAYER0_UNUSED}

pytestmark = pytest.mark.filterwarnings("ignore:According to Bo")


def perturbed(dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    """RWKV-LM-named weights with noise everywhere, so every transpose and reshape is visible."""
    return {k: v.to(dtype) for k, v in perturb(rwkv_lm_state_dict(L, C, N, V, seed), seed).items()}


def convert(*args: object) -> int:
    return main([str(a) for a in args])


def files_in(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], skip: set[str] = frozenset()) -> None:
    assert set(a) - skip == set(b) - skip
    for name in set(a) - skip:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def restored_layer0(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    init = value_residual_init(C, 32, torch.Generator().manual_seed(0))
    return {f"blocks.0.att.{k}": v.to(dtype) for k, v in init.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rwkv_lm_to_fla_to_rwkv_lm_is_bit_exact(tmp_path, capsys, dtype):
    state = perturbed(dtype)
    torch.save(state, tmp_path / "in.pth")
    assert convert(tmp_path / "in.pth", tmp_path / "fla") == 0
    assert "dropped blocks.0.att.v0, blocks.0.att.v1, blocks.0.att.v2" in capsys.readouterr().out
    assert convert(tmp_path / "fla", tmp_path / "out.pth") == 0
    assert "restored blocks.0.att.v0, blocks.0.att.v1, blocks.0.att.v2 with RWKV-LM's init values" in \
        capsys.readouterr().out
    back = torch.load(tmp_path / "out.pth", weights_only=True)
    assert_same(state, back, skip=LAYER0_UNUSED_NAMES)
    assert_same({k: back[k] for k in LAYER0_UNUSED_NAMES}, restored_layer0(dtype))


def test_fla_directory_layout_follows_the_name_map(tmp_path):
    state = perturbed()
    torch.save(state, tmp_path / "in.pth")
    assert convert(tmp_path / "in.pth", tmp_path / "fla") == 0
    fla = load_file(str(tmp_path / "fla" / "model.safetensors"))
    att = "model.layers.1.attn"
    assert torch.equal(fla[f"{att}.w_lora.lora.0.weight"], state["blocks.1.att.w1"].t())
    assert torch.equal(fla[f"{att}.w_lora.lora.2.weight"], state["blocks.1.att.w2"].t())
    assert torch.equal(fla[f"{att}.w_lora.lora.2.bias"], state["blocks.1.att.w0"].flatten())
    assert torch.equal(fla[f"{att}.v_lora.lora.0.weight"], state["blocks.1.att.v1"].t())
    assert torch.equal(fla[f"{att}.g_lora.lora.2.weight"], state["blocks.1.att.g2"].t())
    assert torch.equal(fla[f"{att}.k_k"], state["blocks.1.att.k_k"].flatten())
    assert torch.equal(fla[f"{att}.x_r"], state["blocks.1.att.x_r"])
    assert torch.equal(fla[f"{att}.r_proj.weight"], state["blocks.1.att.receptance.weight"])
    assert torch.equal(fla[f"{att}.g_norm.bias"], state["blocks.1.att.ln_x.bias"])
    assert torch.equal(fla["model.layers.2.ffn.x_k"], state["blocks.2.ffn.x_k"].flatten())
    assert torch.equal(fla["model.layers.0.pre_norm.weight"], state["blocks.0.ln0.weight"])
    assert torch.equal(fla["model.layers.2.ffn_norm.bias"], state["blocks.2.ln2.bias"])
    assert torch.equal(fla["lm_head.weight"], state["head.weight"])
    assert torch.equal(fla["model.norm.weight"], state["ln_out.weight"])
    assert not any(k.startswith("model.layers.0.attn.v_lora") for k in fla)
    config = json.loads((tmp_path / "fla" / "config.json").read_text())
    assert config["architectures"] == ["RWKV7ForCausalLM"] and config["model_type"] == "rwkv7"
    dims = (config["hidden_size"], config["num_hidden_layers"], config["head_dim"], config["vocab_size"])
    assert dims == (C, L, N, V)
    assert (config["decay_low_rank_dim"], config["a_low_rank_dim"], config["v_low_rank_dim"],
            config["gate_low_rank_dim"]) == (32, 32, 32, 64)
    assert (config["fuse_norm"], config["norm_eps"], config["intermediate_size"], config["tie_word_embeddings"]) == \
        (False, 1e-5, 4 * C, False)


@needs_fla
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fla_directory_loads_with_from_pretrained(tmp_path, dtype):
    from fla.models import RWKV7ForCausalLM

    torch.save(perturbed(dtype), tmp_path / "in.pth")
    assert convert(tmp_path / "in.pth", tmp_path / "fla") == 0
    model = RWKV7ForCausalLM.from_pretrained(tmp_path / "fla")
    written = load_file(str(tmp_path / "fla" / "model.safetensors"))
    assert_same(model.state_dict(), written)
    assert model.config.v_low_rank_dim == 32 and not model.config.fuse_norm


@pytest.mark.parametrize("impl", ["fla", "reference"])
def test_harness_to_fla_to_harness_is_bit_exact(tmp_path, capsys, impl):
    if impl == "fla" and FLA is None:
        pytest.skip("impl=fla not importable")
    model = RWKV(impls.get(impl), CFG)
    model.load_canonical_state_dict(perturbed(seed=3))
    save_model(tmp_path / "in.safetensors", model, extra={"step": 7})
    assert convert(tmp_path / "in.safetensors", tmp_path / "fla") == 0
    assert convert(tmp_path / "fla", tmp_path / "out.safetensors", "--impl", impl) == 0
    out = capsys.readouterr().out
    back = load_checkpoint(tmp_path / "out.safetensors")
    assert (back.impl, back.config) == (impl, CFG)
    absent = LAYER0_UNUSED <= model.impl.name_map.absent_in_layer0
    assert ("restored" in out) != absent
    skip = set() if absent else LAYER0_UNUSED_NAMES
    assert_same(model.state_dict(), back.state, skip=skip)
    load_model_state(RWKV(impls.get(impl), CFG), tmp_path / "out.safetensors")


def test_harness_checkpoint_of_fla_converts_without_fla_in_the_loop(tmp_path):
    """The converter knows fla's name map itself: rwkv-lm -> harness(fla) -> rwkv-lm needs no fla import."""
    state = perturbed(torch.bfloat16, seed=5)
    torch.save(state, tmp_path / "in.pth")
    assert convert(tmp_path / "in.pth", tmp_path / "h.safetensors", "--impl", "fla") == 0
    checkpoint = load_checkpoint(tmp_path / "h.safetensors")
    assert checkpoint.impl == "fla"
    assert torch.equal(checkpoint.state["blocks.2.att.a_lora.lora.0.weight"], state["blocks.2.att.a1"].t())
    assert convert(tmp_path / "h.safetensors", tmp_path / "out.pth") == 0
    assert_same(state, torch.load(tmp_path / "out.pth", weights_only=True), skip=LAYER0_UNUSED_NAMES)


@needs_fla
def test_shared_init_and_converter_use_the_same_mapping(tmp_path):
    assert FLA.name_map is FLA_ATT_NAME_MAP
    model = RWKV(FLA, CFG)
    state = apply_init(model, "shared", seed=9)
    torch.save(state, tmp_path / "init.pth")
    assert convert(tmp_path / "init.pth", tmp_path / "init.safetensors", "--impl", "fla") == 0
    assert_same(model.state_dict(), load_checkpoint(tmp_path / "init.safetensors").state)


def test_canonical_safetensors_reads_as_rwkv_lm(tmp_path):
    """The training code's init=shared file: RWKV-LM names in a safetensors file without harness metadata."""
    state = perturbed(torch.bfloat16)
    save_file(state, str(tmp_path / "init.safetensors"))
    assert convert(tmp_path / "init.safetensors", tmp_path / "out.pth") == 0
    assert_same(state, torch.load(tmp_path / "out.pth", weights_only=True))


def test_dtype_option_casts_every_tensor(tmp_path):
    torch.save(perturbed(), tmp_path / "in.pth")
    assert convert(tmp_path / "in.pth", tmp_path / "fla", "--dtype", "bf16") == 0
    written = load_file(str(tmp_path / "fla" / "model.safetensors"))
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "fla" / "config.json").read_text())["dtype"] == "bfloat16"


def test_dry_run_prints_the_table_and_writes_nothing(tmp_path, capsys):
    torch.save(perturbed(), tmp_path / "in.pth")
    before = files_in(tmp_path)
    assert convert(tmp_path / "in.pth", tmp_path / "fla", "--dry-run") == 0
    out = capsys.readouterr().out
    assert files_in(tmp_path) == before
    assert "dry run: nothing written" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith(("blocks.", "emb"))}
    assert rows["blocks.1.att.w1"][:3] == ["T", "model.layers.1.attn.w_lora.lora.0.weight", "32x128"]
    assert rows["blocks.1.att.w0"][:2] == ["reshape", "model.layers.1.attn.w_lora.lora.2.bias"]
    assert rows["blocks.0.att.v1"] == ["dropped", "(dropped)"]
    assert rows["emb.weight"][:2] == ["-", "model.embeddings.weight"]


def _wrong_shape(tmp_path: Path) -> list[object]:
    state = perturbed()
    state["blocks.1.att.w2"] = torch.zeros(48, C)
    torch.save(state, tmp_path / "in.pth")
    return [tmp_path / "in.pth", tmp_path / "out", "blocks.1.att.w2 has shape [48, 128], expected [32, 128]"]


def _missing(tmp_path: Path) -> list[object]:
    state = perturbed()
    del state["blocks.2.ffn.key.weight"]
    torch.save(state, tmp_path / "in.pth")
    return [tmp_path / "in.pth", tmp_path / "out", "missing tensor blocks.2.ffn.key.weight"]


def _unexpected(tmp_path: Path) -> list[object]:
    torch.save({**perturbed(), "blocks.1.att.gate.weight": torch.zeros(C, C)}, tmp_path / "in.pth")
    return [tmp_path / "in.pth", tmp_path / "out", "unexpected tensor blocks.1.att.gate.weight"]


def _fla_wrong_shape(tmp_path: Path) -> list[object]:
    torch.save(perturbed(), tmp_path / "in.pth")
    assert convert(tmp_path / "in.pth", tmp_path / "fla") == 0
    weights = load_file(str(tmp_path / "fla" / "model.safetensors"))
    weights["model.layers.2.attn.a_lora.lora.0.weight"] = torch.zeros(16, C)
    save_file(weights, str(tmp_path / "fla" / "model.safetensors"))
    return [tmp_path / "fla", tmp_path / "out.pth",
            "model.layers.2.attn.a_lora.lora.0.weight has shape [16, 128], expected [32, 128]"]


def _fla_config_disagrees(tmp_path: Path) -> list[object]:
    torch.save(perturbed(), tmp_path / "in.pth")
    assert convert(tmp_path / "in.pth", tmp_path / "fla") == 0
    config = json.loads((tmp_path / "fla" / "config.json").read_text())
    (tmp_path / "fla" / "config.json").write_text(json.dumps({**config, "hidden_size": 256}))
    return [tmp_path / "fla", tmp_path / "out.pth", "config.json says hidden_size=256 but the tensors say 128"]


def _rank_not_buildable_by_harness(tmp_path: Path) -> list[object]:
    state = perturbed()
    for i in range(L):
        state[f"blocks.{i}.att.g1"], state[f"blocks.{i}.att.g2"] = torch.zeros(C, 96), torch.zeros(96, C)
    torch.save(state, tmp_path / "in.pth")
    return [tmp_path / "in.pth", tmp_path / "out.safetensors", "blocks.0.att.g1 has LoRA rank 96"]


def _destination_exists(tmp_path: Path) -> list[object]:
    torch.save(perturbed(), tmp_path / "in.pth")
    (tmp_path / "out.pth").write_text("keep me")
    return [tmp_path / "in.pth", tmp_path / "out.pth", "exists; pass --force"]


def _not_a_checkpoint(tmp_path: Path) -> list[object]:
    save_file({"x": torch.zeros(2)}, str(tmp_path / "in.safetensors"))
    return [tmp_path / "in.safetensors", tmp_path / "out.pth", "--from", "harness", "not a harness checkpoint"]


def _not_a_model(tmp_path: Path) -> list[object]:
    save_file({"x": torch.zeros(2)}, str(tmp_path / "in.safetensors"))
    return [tmp_path / "in.safetensors", tmp_path / "out.pth", "missing tensor emb.weight"]


def _impl_for_non_harness_target(tmp_path: Path) -> list[object]:
    torch.save(perturbed(), tmp_path / "in.pth")
    return [tmp_path / "in.pth", tmp_path / "fla", "--impl", "fla", "--impl names the implementation"]


@pytest.mark.parametrize("case", [_wrong_shape, _missing, _unexpected, _fla_wrong_shape, _fla_config_disagrees,
                                  _rank_not_buildable_by_harness, _destination_exists, _not_a_checkpoint,
                                  _not_a_model, _impl_for_non_harness_target])
def test_user_errors_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, case):
    *args, fragment = case(tmp_path)
    capsys.readouterr()
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code = convert(*args)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert_user_error(code, captured.err, fragment)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_cli_runs_as_module_and_fails_without_traceback(tmp_path):
    torch.save(perturbed(), tmp_path / "in.pth")
    ok = run_module("harness.convert", tmp_path / "in.pth", tmp_path / "fla")
    assert ok.returncode == 0 and "wrote" in ok.stdout
    assert_process_user_error(run_module("harness.convert", tmp_path / "in.pth", tmp_path / "fla"),
                              "exists; pass --force")
    assert_process_user_error(run_module("harness.convert", "--dtype", "fp64", "a", "b"),
                              "argument --dtype: invalid choice")


def test_checkpoint_records_impl_and_config_and_refuses_other_impls(tmp_path):
    model = RWKV(impls.get("reference"), CFG)
    save_model(tmp_path / "m.safetensors", model, extra={"step": 12})
    checkpoint = load_checkpoint(tmp_path / "m.safetensors")
    assert (checkpoint.impl, checkpoint.config, checkpoint.extra) == ("reference", CFG, {"step": 12})
    assert_same(checkpoint.state, model.state_dict())
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    with pytest.raises(CheckpointError, match="n_layer"):
        load_model_state(RWKV(impls.get("reference"), ModelConfig(2, C, N, V)), tmp_path / "m.safetensors")
    torch.save(perturbed(), tmp_path / "in.pth")
    assert convert(tmp_path / "in.pth", tmp_path / "fla.safetensors", "--impl", "fla") == 0
    with pytest.raises(CheckpointError, match="holds impl 'fla' weights.*convert it first"):
        load_model_state(model, tmp_path / "fla.safetensors")


def test_every_written_file_has_the_permissions_of_a_new_file(tmp_path):
    torch.save(perturbed(), tmp_path / "in.pth")
    (tmp_path / "plain").write_text("")
    expected = (tmp_path / "plain").stat().st_mode & 0o777  # what the umask gives any new file
    for dst in ("out.pth", "out.safetensors", "fla"):
        assert convert(tmp_path / "in.pth", tmp_path / dst) == 0
    written = [tmp_path / "out.pth", tmp_path / "out.safetensors", *(tmp_path / "fla").iterdir()]
    assert {path.name: path.stat().st_mode & 0o777 for path in written} == dict.fromkeys(
        ["out.pth", "out.safetensors", "config.json", "model.safetensors"], expected)


def _run_with(tmp_path: Path, run_json: str, last_json: str) -> Path:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "run.json").write_text(run_json)
    (run / "checkpoints" / "last.json").write_text(last_json)
    (run / "checkpoints" / "step-1.ckpt").write_text("")
    return run


@pytest.mark.parametrize(("run_json", "last_json", "message"), [
    ("{}", "{bad", "checkpoints/last.json is unreadable (JSONDecodeError: Expecting property name enclosed in "
                   "double quotes: line 1 column 2 (char 1)); name the checkpoint to convert instead: "),
    ("{bad", '{"step": 1, "path": "step-1.ckpt"}', "cannot read the run's impl and model config from "),
])
def test_an_unreadable_run_file_gets_the_converters_advice_not_the_trainers(tmp_path, capsys, run_json, last_json,
                                                                          message):
    code = convert(_run_with(tmp_path, run_json, last_json), tmp_path / "out.pth")
    err = capsys.readouterr().err
    assert_user_error(code, err, message)
    assert "overwrite=true" not in err and not (tmp_path / "out.pth").exists()
