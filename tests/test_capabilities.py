"""Every algorithm x every option that needs a capability: the option works (shown by what it
leaves in the run) or the run is refused with exit 2, naming the key and the algorithm,
before anything is written. Nothing is silently ignored."""
import json

import pytest
import torch
from safetensors.torch import load_file

from actors.protocol import Broadcast, ClientResult, GuardableUpdates
from conftest import tiny_overrides
from raysim import algorithms
from raysim.cli import main
from raysim.config import load_config
from raysim.run.seeding import sample_clients

FAST = {"rounds": 1, "clients.per_round": 4, "eval.every": 100, "robust.quarantine_rounds": 0}
# (config file, overrides): each algorithm at its tiny size
SETUPS = {
    "fedavg": ("configs/quickstart.yaml", {}),
    "fedprox": ("configs/quickstart.yaml", {"algorithm.name": "fedprox"}),
    "fst_cbdg": ("configs/fst_cbdg.yaml", {}),
    "fedlarge": (
        "configs/fedlarge.yaml",
        {
            "algorithm.options.base": "config",
            "algorithm.options.caption_noise.clients": "[]",
            "algorithm.options.quality": "none",
            "algorithm.options.contribution": "none",
            "lora.target_modules": "[q_proj,v_proj]",
            "model.max_text_len": 16,
            "train.keep_optimizer_state": "false",
        },
    ),
    "synthetic": (
        "configs/quickstart.yaml",
        {"algorithm.name": "synthetic", "algorithm.options.num_params": 2000, "pretrain.enabled": "false"},
    ),
    "creamfl": ("configs/creamfl.yaml", {"clients.total": 6, "algorithm.options.public_size": 32,
                                         "algorithm.options.client_width": 16}),
    "mfed": ("configs/mfed.yaml", {"model.hidden_size": 16, "clients.total": 12}),
    "fedrecon": ("configs/fedrecon.yaml", {"algorithm.options.latent_dim": 8, "rounds": 3, "algorithm.options.phase_a": 1,
                                           "algorithm.options.phase_b": 1}),
}
GUARDABLE = ["fedavg", "fedprox", "fst_cbdg", "fedlarge", "synthetic"]
NOT_GUARDABLE = ["creamfl", "mfed", "fedrecon"]

# option -> overrides that ask for it (and what the working run is compared with)
GUARD_OPTIONS = {
    "privacy.dp": {"privacy.dp": "true", "privacy.noise_multiplier": 1.0},
    "privacy.secure_aggregation": {"privacy.secure_aggregation": "true"},
    "robust.rule": {"robust.rule": "median"},
    "robust.max_norm_ratio": {"robust.max_norm_ratio": 1.0},
    "robust.max_update_norm": {"robust.max_update_norm": 1e-12},
    "faults.nan_clients": {},  # every guardable run below has one NaN client
    "faults.byzantine_fraction": {"faults.byzantine_fraction": 0.25},
}
LORA_OPTIONS = {"algorithm.lora_aggregation": {"algorithm.lora_aggregation": "product"},
                "lora.client_ranks": {"lora.client_ranks": "[2,4]", "algorithm.lora_aggregation": "hetlora"}}


def overrides(name: str, **extra) -> tuple[str, list[str]]:
    config, own = SETUPS[name]
    return config, tiny_overrides(**{**FAST, **own, **extra})  # `own` may need more rounds than FAST


def nan_client(name: str) -> int:
    cfg = load_config(*overrides(name))
    return sample_clients(cfg.seed, 1, cfg.clients.total, cfg.clients.per_round)[0]


_runs: dict[tuple, object] = {}


def run(tmp_path_factory, name: str, option: str | None):
    """One round of `name` with one NaN client and the option's overrides (cached per cell)."""
    key = (name, option)
    if key not in _runs:
        extra = {"faults.nan_clients": f"[{nan_client(name)}]", **(GUARD_OPTIONS.get(option) or {})}
        config, over = overrides(name, **extra)
        out = tmp_path_factory.mktemp(f"{name}-{option or 'plain'}")
        assert main(["run", config, *over, "--out", str(out / "run"), "--quiet"]) == 0
        _runs[key] = out / "run"
    return _runs[key]


def record(out) -> dict:
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[1])


def final(out) -> dict:
    return load_file(str(sorted((out / "checkpoints").iterdir())[-1] / "server.safetensors"))


def distance(a, b) -> float:
    return float(torch.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a)))


def refused(name: str, extra: dict, key: str, tmp_path, capsys) -> None:
    config, over = overrides(name, **extra)
    out = tmp_path / "refused"
    assert main(["run", config, *over, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert key in err and f"'{name}'" in err and "Traceback" not in err, err
    assert not out.exists()  # refused before anything was written


def test_every_algorithm_is_in_the_table():
    import importlib
    import pkgutil

    import raysim.algorithms as package

    modules = {m.name: importlib.import_module(f"raysim.algorithms.{m.name}") for m in pkgutil.iter_modules(package.__path__)}
    files = {name for name, module in modules.items() if hasattr(module, "ALGORITHM")}  # common.py is none
    assert files == set(SETUPS)
    for name in SETUPS:  # the table's split is what each algorithm declares
        alg = algorithms.load(name)(load_config(*overrides(name)))
        assert isinstance(alg, GuardableUpdates) == (name in GUARDABLE), name


@pytest.mark.parametrize("option", sorted(GUARD_OPTIONS))
@pytest.mark.parametrize("name", NOT_GUARDABLE)
def test_guard_options_refused_where_updates_have_no_reference(name, option, tmp_path, capsys):
    extra = GUARD_OPTIONS[option] or {"faults.nan_clients": "[0]"}
    refused(name, extra, option, tmp_path, capsys)


@pytest.mark.parametrize("option", sorted(GUARD_OPTIONS))
@pytest.mark.parametrize("name", GUARDABLE)
def test_guard_options_work(name, option, tmp_path_factory):
    out = run(tmp_path_factory, name, option)
    rec = record(out)
    bad = nan_client(name)
    assert torch.stack([t.float().abs().max() for t in final(out).values()]).isfinite().all()
    if option == "faults.nan_clients":
        assert rec["rejected"].get("nonfinite") == 1 and bad in rec["rejected_clients"]
    elif option == "robust.max_update_norm":
        assert rec["rejected"].get("norm") == len(rec["clients"]) - 1  # all but the NaN client
        assert distance(final(out), final(run(tmp_path_factory, name, None))) > 0  # the model kept
    elif option == "robust.max_norm_ratio":
        assert rec["rejected"].get("norm_ratio", 0) >= 1
    elif option == "privacy.dp":
        assert rec["epsilon"] > 0
    elif option == "privacy.secure_aggregation":
        # masked, then summed exactly: the same model as the plain run (NaN client screened in both)
        plain, masked = final(run(tmp_path_factory, name, None)), final(out)
        assert all(torch.allclose(masked[k], plain[k], rtol=0, atol=1e-5) for k in plain)
        assert len(list(out.rglob("secagg.secret"))) == len(rec["clients"])
    elif option == "robust.rule":  # the median of the round's updates, not their mean
        assert distance(final(out), final(run(tmp_path_factory, name, None))) > 1e-6
    elif option == "faults.byzantine_fraction":
        assert distance(final(out), final(run(tmp_path_factory, name, None))) > 1e-6
    else:
        raise AssertionError(option)


# fedavg, fedprox and fedlarge are settings of the one LoRA path (raysim/lora/), which folds
# adapters by the LoRA rules and trains heterogeneous ranks; every other algorithm must refuse both.
LORA_PATH = ["fedavg", "fedprox", "fedlarge"]
LORA_REFUSALS = [(name, option) for name in SETUPS if name not in LORA_PATH for option in sorted(LORA_OPTIONS)]


@pytest.mark.parametrize("name,option", LORA_REFUSALS)
def test_lora_options_refused_where_the_fold_does_not_read_them(name, option, tmp_path, capsys):
    refused(name, LORA_OPTIONS[option], option, tmp_path, capsys)


@pytest.mark.parametrize("name", LORA_PATH)
def test_product_rule_folds_the_dense_sum(name):
    """algorithm.lora_aggregation=product: the new adapter's scaling * B @ A is the weighted
    mean of the clients' B @ A (the clients share A here, so rank r represents it exactly)."""
    cfg = load_config(*overrides(name, **{"algorithm.lora_aggregation": "product"}))
    alg = algorithms.load(name)(cfg)
    gen = torch.Generator().manual_seed(0)
    r, scaling = cfg.lora.r, cfg.lora.alpha / cfg.lora.r
    a = torch.randn(r, 6, generator=gen)
    bs = {0: torch.randn(5, r, generator=gen), 1: torch.randn(5, r, generator=gen)}
    key = "m.q_proj.lora_{}.weight"
    msg = Broadcast(1, {key.format("A"): a, key.format("B"): torch.zeros(5, r)})
    acc = alg.zero(msg)
    for c, w in ((0, 3), (1, 1)):
        acc = alg.accumulate(acc, ClientResult(c, w, {key.format("A"): a, key.format("B"): bs[c]}))
    new = alg.finalize(msg.tensors, acc)
    dense = scaling * new[key.format("B")].double() @ new[key.format("A")].double()
    expected = scaling * (0.75 * bs[0] + 0.25 * bs[1]).double() @ a.double()
    torch.testing.assert_close(dense, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", LORA_PATH)
def test_heterogeneous_ranks_train(name, tmp_path):
    config, over = overrides(name, **LORA_OPTIONS["lora.client_ranks"])
    assert main(["run", config, *over, "--out", str(tmp_path / "run"), "--quiet"]) == 0
    rec = record(tmp_path / "run")
    ranks = [2 if c % 2 == 0 else 4 for c in rec["clients"]]
    assert rec["client_means"]["rank"] == pytest.approx(sum(ranks) / len(ranks))


def test_fedlarge_contribution_needs_every_update(tmp_path, capsys):
    extra = {"algorithm.options.contribution": "gradient", "privacy.dp": "true", "privacy.noise_multiplier": 1.0}
    refused("fedlarge", extra, "algorithm.options.contribution", tmp_path, capsys)


def test_product_rule_refused_with_privacy(tmp_path, capsys):
    extra = {"algorithm.lora_aggregation": "product", "privacy.secure_aggregation": "true"}
    refused("fedavg", extra, "algorithm.lora_aggregation", tmp_path, capsys)


# The LoRA path's settings (the lora: section beyond the adapter's shape, and the caption
# noise its data applies): row key -> overrides asking for it.
PATH_OPTIONS = {
    "lora.quality": {"lora.quality.mode": "weight"},
    "lora.contribution": {"lora.contribution.mode": "gradient"},
    "lora.backend": {"lora.backend.name": "deepspeed"},
    "lora.lock_text_tower": {"lora.lock_text_tower": "true"},
    "faults.caption_noise": {"faults.caption_noise.clients": "[0]"},
}
PATH_REFUSALS = [(name, option) for name in SETUPS if name not in ("fedavg", "fedprox") for option in PATH_OPTIONS]


@pytest.mark.parametrize("name,option", PATH_REFUSALS)
def test_lora_path_settings_refused_off_the_path(name, option, tmp_path, capsys):
    """Off the path nothing reads them; fedlarge takes them from its algorithm.options."""
    refused(name, PATH_OPTIONS[option], option, tmp_path, capsys)


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_quality_and_contribution_work_on_fedavg_and_fedprox(name, tmp_path):
    extra = {**PATH_OPTIONS["lora.contribution"], **PATH_OPTIONS["faults.caption_noise"], "lora.quality.mode": "filter"}
    config, over = overrides(name, **extra)
    assert main(["run", config, *over, "--out", str(tmp_path / "run"), "--quiet"]) == 0
    rec = record(tmp_path / "run")
    assert set(rec["contribution"]) == {str(c) for c in rec["clients"]}
    assert all(-1 <= s <= 1 for s in rec["contribution"].values())
    assert 0.6 < rec["client_means"]["kept_fraction"] < 0.8  # each client's lowest-scoring 30% dropped
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["contribution"]["rounds"]
    alg = algorithms.load(name)(load_config(config, over))
    assert alg.data.mismatched[alg.data.client_partition[0]].sum() > 0  # client 0's captions were shuffled


def test_locked_tower_refused_where_the_base_cannot_take_text_features(tmp_path, capsys):
    refused("fedavg", PATH_OPTIONS["lora.lock_text_tower"], "lora.lock_text_tower", tmp_path, capsys)
