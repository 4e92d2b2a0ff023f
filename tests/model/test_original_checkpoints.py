"""``feda2v-tk convert``: original FedA2V checkpoints -> model files.

The checkpoints are built here with a faithful re-creation of the original ``VAEGenerator`` layout
(``nn.Sequential`` with Linear/ReLU/Dropout at the original indices, optional Conv1d upsampler) and
saved with the original dict keys (client and server files), at tiny sizes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from feda2v_toolkit.cli import main
from feda2v_toolkit.errors import InputError, UsageError
from feda2v_toolkit.model.file import load_model, read_model_metadata
from feda2v_toolkit.model.original_checkpoints import convert, convert_checkpoints

D, L_RED, H, Z = 8, 4, 16, 4
FULL = 50


class OrigVAEGenerator(nn.Module):
    """The original unconditioned VAEGenerator's layout (generators.py), state-dict compatible."""

    def __init__(self, input_dim: int, hidden_dim: int = 512, latent_dim: int = 256, sequence_length: int = 4,
                 use_learned_upsampling: bool = False) -> None:
        super().__init__()
        self.latent_dim, self.sequence_length, self.output_dim = latent_dim, sequence_length, input_dim
        total = sequence_length * input_dim
        self.encoder = nn.Sequential(
            nn.Linear(total, hidden_dim), nn.ReLU(), nn.Dropout(p=0.2),
            nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), nn.Dropout(p=0.2),
            nn.Linear(hidden_dim, latent_dim * 2))
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden_dim), nn.ReLU(), nn.Dropout(p=0.2),
            nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), nn.Dropout(p=0.2),
            nn.Linear(hidden_dim, total))
        self.use_learned_upsampling = use_learned_upsampling
        self.upsampler = nn.Sequential(
            nn.Conv1d(input_dim, hidden_dim, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv1d(hidden_dim, hidden_dim, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv1d(hidden_dim, input_dim, kernel_size=3, padding=1)) if use_learned_upsampling else None

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z).view(z.size(0), self.sequence_length, self.output_dim)

    def sample_from(self, z: torch.Tensor, target_sequence_length: int | None = None) -> torch.Tensor:
        """The original ``sample()`` for a given ``z`` (without the never-trained learned upsampler)."""
        decoded = self.decode(z)
        if target_sequence_length is not None and target_sequence_length != self.sequence_length:
            up = F.interpolate(decoded.transpose(1, 2), size=target_sequence_length, mode="linear",
                               align_corners=False)
            decoded = up.transpose(1, 2)
        return decoded


def orig(seed: int, *, dim: int = D, seq: int = L_RED, ups: bool = False) -> OrigVAEGenerator:
    torch.manual_seed(seed)
    return OrigVAEGenerator(dim, H, Z, seq, use_learned_upsampling=ups).eval()


def client_meta(**extra: Any) -> dict[str, Any]:
    """Non-tensor keys of the original client checkpoint (older client: no sequence_length)."""
    return {"client_id": 0, "node_id": 0, "round": 5, "timestamp": "2024-05-01T12:00:00", "generator_type": "vae",
            "diffusion_type": "sd", "generator_training_epochs": 5, "synthetic_samples_per_class": 5,
            "dataset_name": "esc50", "selected_classes": None, "train_folds": [0, 1, 2], "test_folds": [3],
            "num_train_samples": 120, "num_test_samples": 40, "audio_model_name": "MIT/ast", "img_pipe_name": "sd",
            **extra}


def save_unified(path: Path, gen: nn.Module, **extra: Any) -> Path:
    opt = torch.optim.AdamW(gen.parameters(), lr=1e-3)
    ckpt = client_meta(generator_granularity="unified", generator_key=None, class_name=None, group_name=None,
                       generator_classes=None, generator_state_dict=gen.state_dict(),
                       optimizer_state_dict=opt.state_dict())
    ckpt.update(extra)
    torch.save(ckpt, path)
    return path


def save_per_class(directory: Path, gens: dict[str, nn.Module], *, seq: int | None = L_RED) -> list[Path]:
    paths = []
    for name, gen in gens.items():
        p = directory / f"client_generator_node0_class_{name}.pt"
        ckpt = client_meta(generator_granularity="per_class", generator_key=name, class_name=name, group_name=None,
                           generator_classes=[name], generator_state_dict={k: v.cpu() for k, v in
                                                                           gen.state_dict().items()},
                           visual_dim=768, use_conditioned_vae=False)
        if seq is not None:
            ckpt["sequence_length"] = seq
        torch.save(ckpt, p)
        paths.append(p)
    return paths


def save_server(path: Path, gens: dict[str, nn.Module], *, seq: int | None = L_RED, **extra: Any) -> Path:
    ckpt: dict[str, Any] = {
        "checkpoint_type": "server", "is_global": True, "round": 10, "timestamp": "2024-05-02T00:00:00",
        "generator_type": "vae", "diffusion_type": "sd", "generator_training_epochs": 5,
        "synthetic_samples_per_class": "auto", "num_clients": 2,
        "client_metadata": [{"client_id": 0, "dataset": "esc50", "selected_classes": ["dog"]}],
        "federated_datasets": ["esc50"], "federated_classes": list(gens), "audio_model_name": "MIT/ast",
        "img_pipe_name": "sd", "global_model_train": False, "global_model_train_from_nodes_adapters": True,
        "prompt_generators": {k: g.state_dict() for k, g in gens.items()}, "generator_optimizers": None,
        "use_conditioned_vae": False, "generator_keys": list(gens), "num_generators": len(gens)}
    if seq is not None:
        ckpt["sequence_length"] = seq
    ckpt.update(extra)
    torch.save(ckpt, path)
    return path


def expected_sample(gen: OrigVAEGenerator, n: int, seed: int, length: int | None) -> torch.Tensor:
    z = torch.randn(n, Z, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return gen.sample_from(z, target_sequence_length=length)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    return int(exc.value.code or 0), out.out, out.err


def assert_one_line_error(code: int, err: str, *needles: str, rc: int = 1) -> None:
    lines = err.strip().splitlines()
    assert code == rc, err
    assert len(lines) == 1, err
    assert lines[0].startswith("feda2v-tk: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# -- numeric equivalence ---------------------------------------------------------------------------------
def test_unified_decoder_matches_original(tmp_path: Path) -> None:
    g = orig(1)
    path = save_unified(tmp_path / "client_generator_node0.pt", g)
    result = convert_checkpoints([path], dim=D, class_names="dog,cat", full_length=FULL)
    model = result.model
    gen = model.generators["all"]
    assert (gen.seq_len, gen.dim, gen.hidden_dim, gen.latent_dim) == (L_RED, D, H, Z)
    z = torch.randn(7, Z)
    with torch.no_grad():
        torch.testing.assert_close(gen.decode(z), g.decode(z), rtol=0, atol=0)
        mu, logvar = gen.encode(torch.randn(3, L_RED, D).requires_grad_(False))
    assert mu.shape == logvar.shape == (3, Z)
    assert model.normalization == {}
    assert model.reducer_name == "adaptive_avg" and model.reducer.length == L_RED
    assert model.upsampler_name == "linear"
    assert (model.full_length, model.training_length, model.output_length) == (FULL, L_RED, None)


@pytest.mark.parametrize("length", [None, L_RED, 13, FULL])
def test_sample_equals_original_sample_with_interpolation(tmp_path: Path, length: int | None) -> None:
    g = orig(2)
    path = save_unified(tmp_path / "u.pt", g, selected_classes=["dog", "cat"])
    out = tmp_path / "m.safetensors"
    convert([path], out, dim=D, full_length=FULL)
    model = load_model(out)
    got = model.sample(5, class_name="cat", length=length, generator=torch.Generator().manual_seed(3))
    want = expected_sample(g, 5, 3, length)
    assert got.shape == (5, length or L_RED, D)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_output_length_is_the_default_sample_length(tmp_path: Path) -> None:
    g = orig(3)
    path = save_unified(tmp_path / "u.pt", g, sequence_length=L_RED)
    out = tmp_path / "m.safetensors"
    convert([path], out, full_length=FULL, output_length=FULL, class_names=["a"])
    model = load_model(out)
    assert model.output_length == FULL
    got = model.sample(2, class_name="a", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(got, expected_sample(g, 2, 0, FULL), rtol=1e-6, atol=1e-6)


# -- the supported layouts -----------------------------------------------------------------------------
def test_unified_metadata_and_provenance(tmp_path: Path) -> None:
    path = save_unified(tmp_path / "client_generator_node0.pt", orig(4), selected_classes=["dog", "cat", "bird"])
    out = tmp_path / "m.safetensors"
    result = convert([path], out, dim=D, full_length=FULL)
    meta = read_model_metadata(out)["model"]
    assert meta["class_names"] == ["dog", "cat", "bird"]
    assert meta["class_to_generator"] == {"dog": "all", "cat": "all", "bird": "all"}
    assert meta["normalized"] is False and meta["granularity"] == "unified"
    config = meta["config"]
    assert config["generator_normalize"] is False and config["use_conditioned_vae"] is False
    assert config["generator_training_sequence_length"] == L_RED
    assert (config["generator_hidden_dim"], config["generator_latent_dim"]) == (H, Z)
    assert config["generator_training_epochs"] == 5 and config["synthetic_samples_per_class"] == 5
    (src,) = config["converted_from"]
    assert src["file"] == path.name
    assert src["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert "generator_state_dict" in src["keys"] and "optimizer_state_dict" in src["keys"]
    assert src["dropped"] == ["optimizer_state_dict"]
    assert src["settings"]["dataset_name"] == "esc50" and src["settings"]["train_folds"] == [0, 1, 2]
    assert "generator_state_dict" not in src["settings"]
    info = config["conversion"]["generators"]["all"]
    assert info["hidden_dim"] == H and "the file stores no sequence_length" in info["inferred"]
    assert any("selected_classes" in n for n in result.notes)
    assert any("dropped optimizer_state_dict" in n for n in result.notes)


def test_per_class_client_files_become_one_model(tmp_path: Path) -> None:
    gens = {"dog": orig(10), "cat": orig(11), "rain": orig(12)}
    paths = save_per_class(tmp_path, gens)
    out = tmp_path / "m.safetensors"
    result = convert(paths, out, full_length=FULL)  # D comes from sequence_length: --dim not needed
    model = load_model(out)
    assert model.granularity == "per_class"
    assert model.class_names == ["dog", "cat", "rain"]
    assert model.class_to_generator == {c: c for c in gens}
    assert model.dim == D and model.training_length == L_RED
    for i, (name, g) in enumerate(gens.items()):
        got = model.sample(3, class_name=name, length=20, generator=torch.Generator().manual_seed(i))
        torch.testing.assert_close(got, expected_sample(g, 3, i, 20), rtol=1e-6, atol=1e-6)
    assert [s["file"] for s in result.sources] == [p.name for p in paths]
    assert "from 'sequence_length' in the file" in result.generators["dog"]["inferred"]


def test_classes_option_orders_and_adds_unsampleable_classes(tmp_path: Path) -> None:
    paths = save_per_class(tmp_path, {"dog": orig(10), "cat": orig(11)})
    result = convert_checkpoints(paths, class_names="cat,bird,dog", full_length=FULL)
    assert result.model.class_names == ["cat", "bird", "dog"]
    assert result.model.sampleable_classes == ["cat", "dog"]
    assert list(result.model.generators) == ["cat", "dog"]
    with pytest.raises(UsageError, match="--classes lacks dog"):
        convert_checkpoints(paths, class_names="cat,bird", full_length=FULL)


def test_per_class_key_from_file_name(tmp_path: Path) -> None:
    g = orig(5)
    p = tmp_path / "client_generator_node3_class_dog_round_5.pt"
    torch.save({"generator_state_dict": g.state_dict(), "generator_granularity": "per_class",
                "sequence_length": L_RED}, p)
    result = convert_checkpoints([p], full_length=FULL)
    assert result.model.class_names == ["dog"]
    assert any("taken from the file name" in n for n in result.notes)


def test_per_group_client_files(tmp_path: Path) -> None:
    paths = []
    for i, (group, members) in enumerate({"animals": ["dog", "cat"], "weather": ["rain"]}.items()):
        p = tmp_path / f"client_generator_node0_group_{group}.pt"
        torch.save(client_meta(generator_granularity="per_group", generator_key=group, class_name=None,
                               group_name=group, generator_classes=members, sequence_length=L_RED,
                               generator_state_dict=orig(20 + i).state_dict()), p)
        paths.append(p)
    out = tmp_path / "m.safetensors"
    convert(paths, out, full_length=FULL)
    model = load_model(out)
    assert model.granularity == "per_group"
    assert model.class_names == ["dog", "cat", "rain"]
    assert model.class_to_generator == {"dog": "animals", "cat": "animals", "rain": "weather"}
    assert model.config["generator_class_groups"] == {"animals": ["dog", "cat"], "weather": ["rain"]}


@pytest.mark.parametrize("stored_seq", [L_RED, None])
def test_server_prompt_generators(tmp_path: Path, stored_seq: int | None) -> None:
    gens = {"dog": orig(30), "cat": orig(31)}
    path = save_server(tmp_path / "server_generator_round_10.pt", gens, seq=stored_seq)
    out = tmp_path / "m.safetensors"
    options: dict[str, Any] = {"full_length": FULL}
    if stored_seq is None:
        options["dim"] = D  # nothing else tells l from D
    result = convert([path], out, **options)
    model = load_model(out)
    assert model.granularity == "per_class" and model.class_names == ["dog", "cat"]
    for i, (name, g) in enumerate(gens.items()):
        got = model.sample(2, class_name=name, length=9, generator=torch.Generator().manual_seed(i))
        torch.testing.assert_close(got, expected_sample(g, 2, i, 9), rtol=1e-6, atol=1e-6)
    src = result.sources[0]
    assert src["kind"] == "server" and src["generators"] == ["dog", "cat"]
    assert "generator_optimizers" in src["dropped"]
    assert "synthetic_samples_per_class" not in model.config  # 'auto' needs class counts a conversion lacks


def test_server_without_sequence_length_and_default_dim_is_clear(tmp_path: Path) -> None:
    path = save_server(tmp_path / "s.pt", {"dog": orig(30)}, seq=None)
    with pytest.raises(InputError, match=r"s\.pt.*not a multiple of D = 768.*pass --dim D or --training-length l"):
        convert_checkpoints([path])
    result = convert_checkpoints([path], training_length=L_RED, full_length=FULL)
    assert result.model.dim == D


def test_learned_upsampler_is_dropped_and_gives_d(tmp_path: Path) -> None:
    g = orig(40, ups=True)
    assert any(k.startswith("upsampler.4.") for k in g.state_dict())
    path = save_unified(tmp_path / "u.pt", g, selected_classes=["a", "b"])
    out = tmp_path / "m.safetensors"
    result = convert([path], out, full_length=FULL)  # no sequence_length, no --dim: D from the convs
    model = load_model(out)
    assert (model.dim, model.training_length, model.upsampler_name) == (D, L_RED, "linear")
    assert not any(k.startswith("upsampler.") for k in read_model_metadata(out)["tensor_shapes"])
    assert result.generators["all"]["learned_upsampler_dropped"] is True
    assert any("never trained" in n for n in result.notes)
    got = model.sample(4, class_name="a", length=FULL, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, expected_sample(g, 4, 5, FULL), rtol=1e-6, atol=1e-6)


def test_other_interpolating_upsampler(tmp_path: Path) -> None:
    path = save_unified(tmp_path / "u.pt", orig(6), sequence_length=L_RED)
    result = convert_checkpoints([path], class_names="a", upsampler="nearest", full_length=FULL)
    assert result.model.upsampler_name == "nearest"
    assert result.model.config["generator_upsampler"] == "nearest"


def test_half_precision_weights_are_stored_as_float32(tmp_path: Path) -> None:
    g = orig(7).half()
    path = save_unified(tmp_path / "u.pt", g, sequence_length=L_RED)
    result = convert_checkpoints([path], class_names="a", full_length=FULL)
    gen = result.model.generators["all"]
    assert all(p.dtype == torch.float32 for p in gen.parameters())
    z = torch.randn(3, Z)
    with torch.no_grad():
        torch.testing.assert_close(gen.decode(z), g.float().decode(z), rtol=0, atol=0)
    assert result.generators["all"]["original_dtype"] == ["float16"]


def test_bare_state_dict(tmp_path: Path) -> None:
    g = orig(8)
    path = tmp_path / "vae.pt"
    torch.save(g.state_dict(), path)
    result = convert_checkpoints([path], dim=D, class_names="x", full_length=FULL)
    z = torch.randn(2, Z)
    with torch.no_grad():
        torch.testing.assert_close(result.model.generators["all"].decode(z), g.decode(z), rtol=0, atol=0)


def test_unified_without_class_list_needs_classes(tmp_path: Path) -> None:
    path = save_unified(tmp_path / "u.pt", orig(9))
    with pytest.raises(UsageError, match="lists no classes.*--classes"):
        convert_checkpoints([path], dim=D)


# -- the CLI ---------------------------------------------------------------------------------------------
def test_cli_convert_inspect_generate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from feda2v_toolkit.data.open import open_dataset

    gens = {"dog": orig(50), "cat": orig(51)}
    paths = save_per_class(tmp_path, gens, seq=None)
    out = tmp_path / "model.safetensors"
    code, _, err = run(["convert", *map(str, paths), "-o", str(out), "--dim", str(D), "--full-length",
                        str(FULL), "--output-length", str(FULL)], capsys)
    assert code == 0, err
    assert "wrote" in err and "2 per_class vae generator(s)" in err

    code, stdout, err = run(["inspect", str(out), "--json"], capsys)
    assert code == 0, err
    info = json.loads(stdout)
    assert info["generator_type"]["name"] == "vae" and info["granularity"] == "per_class"
    assert (info["training_length"], info["output_length"], info["dim"]) == (L_RED, FULL, D)
    assert info["normalized"] is False
    assert info["generator_init_args"]["dog"]["hidden_dim"] == H
    assert [s["file"] for s in info["config"]["converted_from"]] == [p.name for p in paths]
    code, stdout, err = run(["inspect", str(out)], capsys)
    assert code == 0, err

    gen_dir = tmp_path / "generated"
    code, _, err = run(["generate", str(out), "-o", str(gen_dir), "-k", "3", "--seed", "0", "--no-progress"], capsys)
    assert code == 0, err
    ds = open_dataset(gen_dir)
    assert (len(ds), ds.seq_len, ds.dim) == (6, FULL, D)
    assert ds.class_names == ["dog", "cat"]
    # `generate` draws class c (label i) from a generator seeded seed * 1_000_003 + i
    rows = next(iter(ds.batches(16)))
    for label, (_name, g) in enumerate(gens.items()):
        got = rows.embeddings[rows.labels == label]
        torch.testing.assert_close(got, expected_sample(g, 3, label, FULL), rtol=1e-5, atol=1e-5)


def test_cli_json_and_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = save_unified(tmp_path / "u.pt", orig(1), sequence_length=L_RED)
    out = tmp_path / "m.safetensors"
    code, stdout, err = run(["convert", str(path), "-o", str(out), "--classes", "a,b", "--dry-run", "--json", "-q"],
                            capsys)
    assert code == 0, err
    assert err == "" and not out.exists()
    report = json.loads(stdout)
    assert report["class_names"] == ["a", "b"] and report["generators"]["all"]["latent_dim"] == Z


def test_installed_executable(tmp_path: Path) -> None:
    exe = shutil.which("feda2v-tk") or str(Path(sys.executable).parent / "feda2v-tk")
    if not os.path.exists(exe):
        pytest.skip("feda2v-tk executable not installed")
    path = save_unified(tmp_path / "u.pt", orig(1), sequence_length=L_RED, selected_classes=["a"])
    out = tmp_path / "m.safetensors"
    ok = subprocess.run([exe, "convert", str(path), "-o", str(out)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert out.is_file()
    bad = subprocess.run([exe, "convert", str(path), "-o", str(path)], capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


# -- refusals: one line naming the file, nonzero exit, nothing written ----------------------------------------
class Opaque:
    """A custom class: pickling an instance of it needs a global, which weights_only refuses."""

    def __init__(self) -> None:
        self.x = 1


def _conditioned_vae_state() -> dict[str, torch.Tensor]:
    enc = nn.Sequential(nn.Linear(2 * L_RED * D, H), nn.LeakyReLU(0.2), nn.Linear(H, H), nn.LeakyReLU(0.2))
    dec = nn.Sequential(nn.Linear(Z + L_RED * D, H), nn.LeakyReLU(0.2), nn.Linear(H, H), nn.LeakyReLU(0.2),
                        nn.Linear(H, L_RED * D), nn.Tanh())
    m = nn.ModuleDict({"encoder": enc, "fc_mu": nn.Linear(H, Z), "fc_logvar": nn.Linear(H, Z), "decoder": dec})
    return m.state_dict()


def _multimodal_state() -> dict[str, torch.Tensor]:
    sd = _conditioned_vae_state()
    proj = nn.Sequential(nn.Linear(L_RED * D, H), nn.LayerNorm(H))
    sd.update({f"clip_projection.{k}": v for k, v in proj.state_dict().items()})
    return sd


def _gan_state() -> dict[str, torch.Tensor]:
    return nn.ModuleDict({"model": nn.Sequential(nn.Linear(Z, H), nn.ReLU(), nn.Linear(H, H), nn.ReLU(),
                                                 nn.Linear(H, D))}).state_dict()


def _bad_shapes() -> dict[str, torch.Tensor]:
    sd = orig(1).state_dict()
    sd["decoder.6.weight"] = torch.zeros(L_RED * D + 1, H)
    return sd


def _nan_weights() -> dict[str, torch.Tensor]:
    sd = orig(1).state_dict()
    sd["decoder.3.weight"][0, 0] = float("nan")
    return sd


def _write(tmp: Path, name: str, obj: Any) -> Path:
    p = tmp / name
    torch.save(obj, p)
    return p


def _truncated(tmp: Path) -> Path:
    p = save_unified(tmp / "truncated.pt", orig(1), sequence_length=L_RED)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p


REFUSALS: dict[str, tuple[Any, tuple[str, ...]]] = {
    "gan_client": (lambda t: _write(t, "gan.pt", client_meta(generator_type="gan", generator_clip_state_dict=_gan_state())),
                   ("gan.pt", "GAN", "no sequence-level equivalent")),
    "gan_in_prompt_generators": (lambda t: _write(t, "gan_server.pt", {"prompt_generators": {"dog": _gan_state()},
                                                                       "generator_type": "gan"}),
                                 ("gan_server.pt", "prompt_generators['dog']", "GAN")),
    "conditioned_vae": (lambda t: _write(t, "cvae.pt", client_meta(generator_granularity="unified",
                                                                   generator_state_dict=_conditioned_vae_state(),
                                                                   use_conditioned_vae=True)),
                        ("cvae.pt", "ConditionedVAEGenerator", "not convertible")),
    "multimodal_vae": (lambda t: _write(t, "mm.pt", client_meta(generator_granularity="per_class", class_name="dog",
                                                                generator_key="dog",
                                                                generator_state_dict=_multimodal_state())),
                       ("mm.pt", "MultiModalVAEGenerator", "not convertible")),
    "pickled_object": (lambda t: _write(t, "pickled.pt", {"generator_state_dict": orig(1).state_dict(),
                                                          "extra": Opaque()}),
                       ("pickled.pt", "pickled Python objects", "Opaque", "weights_only")),
    "truncated": (_truncated, ("truncated.pt", "truncated or corrupt")),
    "text_file": (lambda t: (t / "notes.pt").write_text("hello") and t / "notes.pt",
                  ("notes.pt", "not a readable PyTorch checkpoint")),
    "empty_file": (lambda t: (t / "empty.pt").write_bytes(b"") or t / "empty.pt", ("empty.pt", "truncated or corrupt")),
    "not_a_dict": (lambda t: _write(t, "list.pt", [orig(1).state_dict()]), ("list.pt", "holds a list, not a dict")),
    "no_state_dict": (lambda t: _write(t, "meta.pt", client_meta()), ("meta.pt", "no generator weights",
                                                                      "generator_state_dict")),
    "state_dict_not_a_dict": (lambda t: _write(t, "sd_list.pt", {"generator_state_dict": [1, 2]}),
                              ("sd_list.pt", "not a generator state dict")),
    "inconsistent_shapes": (lambda t: _write(t, "shapes.pt", client_meta(generator_state_dict=_bad_shapes(),
                                                                          sequence_length=L_RED)),
                            ("shapes.pt", "inconsistent shapes", "decoder.6.weight")),
    "missing_layer": (lambda t: _write(t, "partial.pt", {"generator_state_dict": {
        k: v for k, v in orig(1).state_dict().items() if not k.startswith("decoder.3")}, "sequence_length": L_RED}),
                      ("partial.pt", "missing decoder.3.weight")),
    "nan_weights": (lambda t: _write(t, "nan.pt", {"generator_state_dict": _nan_weights(), "sequence_length": L_RED}),
                    ("nan.pt", "NaN or Inf")),
    "ambiguous_dim": (lambda t: save_unified(t / "nodim.pt", orig(1), selected_classes=["a"]),
                      ("nodim.pt", "not a multiple of D = 768", "--dim", "--training-length")),
    "sequence_length_mismatch": (lambda t: save_unified(t / "seq.pt", orig(1), sequence_length=3,
                                                        selected_classes=["a"]),
                                 ("seq.pt", "not a multiple of the training length 3")),
    "safetensors_input": (lambda t: _safetensors(t), ("model.safetensors", "is a safetensors file")),
}


def _safetensors(tmp: Path) -> Path:
    from safetensors.torch import save_file

    p = tmp / "model.safetensors"
    save_file({"x": torch.zeros(2)}, str(p))
    return p


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refused_inputs(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make, needles = REFUSALS[case]
    src = tmp_path / "in"
    src.mkdir()
    path = make(src)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "m.safetensors"
    code, stdout, err = run(["convert", str(path), "-o", str(out)], capsys)
    assert_one_line_error(code, err, *needles)
    assert stdout == ""
    assert list(out_dir.iterdir()) == []  # nothing written, no temp file left


def test_mixed_sequence_lengths_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = save_per_class(tmp_path, {"dog": orig(1, seq=4)}, seq=4)
    b = save_per_class(tmp_path, {"cat": orig(2, seq=2)}, seq=2)
    out = tmp_path / "m.safetensors"
    code, _, err = run(["convert", *map(str, a + b), "-o", str(out)], capsys)
    assert_one_line_error(code, err, b[0].name, "l = 2", "l = 4")
    assert not out.exists()


def test_duplicate_class_across_files_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (a,) = save_per_class(tmp_path, {"dog": orig(1)})
    server = save_server(tmp_path / "server.pt", {"dog": orig(2), "cat": orig(3)})
    out = tmp_path / "m.safetensors"
    code, _, err = run(["convert", str(a), str(server), "-o", str(out)], capsys)
    assert_one_line_error(code, err, "server.pt", "'dog'", a.name)
    assert not out.exists()


def test_two_unified_files_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = save_unified(tmp_path / "a.pt", orig(1), sequence_length=L_RED)
    b = save_unified(tmp_path / "b.pt", orig(2), sequence_length=L_RED)
    code, _, err = run(["convert", str(a), str(b), "-o", str(tmp_path / "m.safetensors"), "--classes", "x"], capsys)
    assert_one_line_error(code, err, "b.pt", "second unified generator")


def test_mixed_granularities_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = save_unified(tmp_path / "a.pt", orig(1), sequence_length=L_RED)
    (b,) = save_per_class(tmp_path, {"dog": orig(2)})
    code, _, err = run(["convert", str(a), str(b), "-o", str(tmp_path / "m.safetensors")], capsys)
    assert_one_line_error(code, err, "cannot mix granularities")


def test_dim_disagreeing_with_sequence_length_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = save_unified(tmp_path / "u.pt", orig(1), sequence_length=L_RED, selected_classes=["a"])
    code, _, err = run(["convert", str(path), "-o", str(tmp_path / "m.safetensors"), "--dim", "16"], capsys)
    assert_one_line_error(code, err, "u.pt", "D = 8", "--dim is 16", rc=2)


def test_output_equal_to_input_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = save_unified(tmp_path / "u.pt", orig(1), sequence_length=L_RED, selected_classes=["a"])
    before = path.read_bytes()
    code, _, err = run(["convert", str(path), "-o", str(path)], capsys)
    assert_one_line_error(code, err, "u.pt", "also an input", rc=2)
    assert path.read_bytes() == before


def test_missing_input_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.safetensors"
    code, _, err = run(["convert", str(tmp_path / "nope.pt"), "-o", str(out)], capsys)
    assert_one_line_error(code, err, "nope.pt", "no such file", rc=2)
    assert not out.exists()


def test_trainable_or_unknown_upsampler_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = save_unified(tmp_path / "u.pt", orig(1), sequence_length=L_RED, selected_classes=["a"])
    code, _, err = run(["convert", str(path), "-o", str(tmp_path / "m.safetensors"), "--upsampler", "nope"], capsys)
    assert_one_line_error(code, err, "nope", rc=2)


def test_failed_conversion_keeps_an_existing_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = save_unified(tmp_path / "u.pt", orig(1), sequence_length=L_RED, selected_classes=["a"])
    out = tmp_path / "m.safetensors"
    assert run(["convert", str(good), "-o", str(out), "-q"], capsys)[0] == 0
    before = out.read_bytes()
    bad = _write(tmp_path, "gan.pt", {"generator_clip_state_dict": _gan_state()})
    code, _, err = run(["convert", str(bad), "-o", str(out), "--overwrite"], capsys)
    assert_one_line_error(code, err, "gan.pt")
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gan.pt", "m.safetensors", "u.pt"]
