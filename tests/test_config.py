import pytest

from raysim.config import ConfigError, apply_overrides, load_config

QUICK = "configs/quickstart.yaml"


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_quickstart_loads_with_its_values():
    cfg = load_config(QUICK)
    assert (cfg.rounds, cfg.clients.total, cfg.clients.per_round) == (20, 50, 10)
    assert cfg.runtime.num_workers == 2 and cfg.runtime.placement == "pooled"
    assert cfg.algorithm.name == "fedavg"


def test_overrides_are_typed_and_nested():
    cfg = load_config(QUICK, ["rounds=3", "train.lr=0.01", "lora.target_modules=[q_proj]", "runtime.placement=dedicated"])
    assert cfg.rounds == 3 and cfg.train.lr == 0.01
    assert cfg.lora.target_modules == ["q_proj"] and cfg.runtime.placement == "dedicated"


def test_overrides_do_not_mutate_input():
    data = {"a": {"b": 1}}
    assert apply_overrides(data, ["a.b=2", "c.d=x"]) == {"a": {"b": 2}, "c": {"d": "x"}}
    assert data == {"a": {"b": 1}}


def test_every_error_listed_at_once_with_file_and_key(tmp_path):
    p = write(tmp_path, "rounds: 0\nclients: {total: 0}\ndata: {alpha: -1}\nlora: {rnk: 4}\ntrain: {lr: fast}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg
    for key in ("rounds", "clients.total", "data.alpha", "lora.rnk", "train.lr"):
        assert f"- {key}:" in msg, key
    assert "unknown key" in msg and "'fast'" in msg


def test_more_clients_per_round_than_clients():
    with pytest.raises(ConfigError, match=r"clients.per_round \(60\) exceeds clients.total \(50\)"):
        load_config(QUICK, ["clients.per_round=60"])


def test_heterogeneous_ranks_need_a_rank_aware_rule():
    with pytest.raises(ConfigError, match="lora_aggregation 'factors' cannot average"):
        load_config(QUICK, ["lora.client_ranks=[2,4]"])
    assert load_config(QUICK, ["lora.client_ranks=[2,4]", "algorithm.lora_aggregation=product"]).lora.client_ranks == [2, 4]


def test_malformed_yaml_names_line(tmp_path):
    p = write(tmp_path, "rounds: 3\nclients: [total: 4\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        load_config(p)


def test_missing_file_and_top_level_list(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_unknown_algorithm_and_options():
    # the typed config does not import algorithms (torch); options_of checks what belongs to them
    from raysim.algorithms import options_of

    with pytest.raises(ConfigError, match="algorithm.name: 'fedsgd' is not a file in raysim/algorithms/"):
        options_of(load_config(QUICK, ["algorithm.name=fedsgd"]))
    with pytest.raises(ConfigError, match="fedavg takes no options"):
        options_of(load_config(QUICK, ["algorithm.options.beta=1"]))


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(QUICK, ["rounds"])


def test_fingerprint_stable_and_sensitive():
    a, b = load_config(QUICK), load_config(QUICK)
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != load_config(QUICK, ["seed=1"]).fingerprint()


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["lora.loss=clip", "lora.backend.name=deepspeed"], "lora.loss 'clip' calls the encoders directly"),
        (["lora.backend.name=deepspeed", "lora.client_ranks=[2,4]", "algorithm.lora_aggregation=hetlora"],
         "lora.client_ranks with lora.backend 'deepspeed'"),
        (["lora.backend.world_size=2"], "need lora.backend.name 'deepspeed'"),
        (["lora.backend.name=deepspeed", "lora.backend.rank_num_cpus=2"], "with world_size 1 the client trains in its worker"),
        (["lora.backend.name=deepspeed", "lora.backend.zero_stage=0", "lora.backend.offload=optimizer"],
         "stage 0 has no optimizer partition"),
        (["lora.minilm.hidden_size=32"], "set lora.base: minilm"),
        (["lora.backend.name=deepspeed", "lora.precision=fp16"], "use lora.precision bf16"),
        (["faults.caption_noise.clients=[50]"], r"faults.caption_noise.clients \[50\] are not client ids"),
    ],
)
def test_lora_path_settings_that_cannot_work_together(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(QUICK, overrides)


def test_lora_loss_auto_is_clip_only_where_the_encoders_can_be_called():
    assert load_config(QUICK).lora.logits() == "clip"
    assert load_config(QUICK, ["lora.backend.name=deepspeed"]).lora.logits() == "model_logits"
    assert load_config(QUICK, ["lora.lock_text_tower=true"]).lora.logits() == "model_logits"
    assert load_config(QUICK, ["lora.loss=model_logits"]).lora.logits() == "model_logits"
