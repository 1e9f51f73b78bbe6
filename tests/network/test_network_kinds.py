"""LoRA, LoCon, DoRA, LoHa and LoKr trained through the loop, checked against A1111's own merge formulas;
continue-from-file; all-or-nothing injection; LoRA+, block weights, dropouts and max norm."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

from lib_lora_trainer.config import ConfigError, TrainingConfig, validate
from lib_lora_trainer.network import kohya_format
from lib_lora_trainer.network.adapters import attached_adapters
from lib_lora_trainer.network.blocks import block_index, block_lr_weights
from lib_lora_trainer.network.max_norm import scale_weight_norms
from lib_lora_trainer.network.param_groups import adapter_param_groups
from lib_lora_trainer.network.plan import load_saved_network, plan_network
from lib_lora_trainer.training.loop import TrainingCallbacks, train
from lib_lora_trainer.training.optim import build_optimizer
from tests.engine.helpers import fixed_inputs, state_fingerprint, tiny_config, tiny_host
from tests.engine.test_training import OutputsAtEpoch, relative_error, small_source
from tests.network.a1111_merge import A1111_PARTS, COMMON_PARTS, a1111_module_type, a1111_updown

NETWORKS = {
    "lora": dict(network_type="lora"),
    "locon": dict(network_type="locon"),
    "dora": dict(network_type="locon", dora_wd=True),
    "loha": dict(network_type="loha", conv_layers=True),
    "loha-tucker": dict(network_type="loha", conv_layers=True, use_tucker=True),
    "lokr": dict(network_type="lokr", conv_layers=True, lokr_factor=4),
    "lokr-tucker": dict(network_type="lokr", conv_layers=True, use_tucker=True, network_dim=2),
}
FAST = dict(gradient_checkpointing="off")  # no memory probe: these tests are about the network
A1111_TYPE = {"lora": "lora", "locon": "lora", "dora": "lora", "loha": "hada", "lokr": "lokr"}


def merge_with_a1111_formula(path, unet, text_encoder) -> set[str]:
    """Add A1111's update of every saved module to a fresh model; returns the A1111 module types used."""
    with safe_open(str(path), framework="pt") as reader:
        tensors = {key: reader.get_tensor(key) for key in reader.keys()}  # noqa: SIM118
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        stem, _, part = key.partition(".")
        modules.setdefault(stem, {})[part] = tensor
    roots = {"unet": unet, "text_encoder": text_encoder}
    types = set()
    with torch.no_grad():
        for stem, parts in modules.items():
            module_type = a1111_module_type(set(parts))
            assert module_type is not None, f"A1111 would not load {stem}: {sorted(parts)}"
            unmatched = set(parts) - A1111_PARTS[module_type] - COMMON_PARTS
            assert not unmatched, f"{stem}: parts A1111's {module_type} module does not read: {unmatched}"
            types.add(module_type)
            component, name = kohya_format.module_name_from_kohya(stem)
            layer = roots[component].get_submodule(name)
            layer.weight += a1111_updown(parts, layer.weight).to(layer.weight.dtype)
    return types


def outputs(host, unet, text_encoder):
    latents, timesteps, token_ids = fixed_inputs(host)
    with torch.no_grad():
        te = text_encoder(input_ids=token_ids).last_hidden_state
        return te, unet(latents, timesteps, context=te)


@pytest.mark.slow
@pytest.mark.parametrize("network", list(NETWORKS))
def test_trained_network_equals_a1111s_merge_of_its_file(tmp_path, network):
    host = tiny_host()
    base_unet, base_te = copy.deepcopy(host.unet()), copy.deepcopy(host.text_encoder())
    recorder = OutputsAtEpoch(host)
    config = tiny_config(tmp_path, epochs=1, **FAST, **NETWORKS[network])
    result = train(host, config, small_source(), recorder)
    assert result.status == "completed", result.message
    path = result.epochs[0].path

    unet, te = copy.deepcopy(base_unet), copy.deepcopy(base_te)
    types = merge_with_a1111_formula(path, unet, te)
    assert types == {A1111_TYPE[network.split("-")[0]]}
    merged_te, merged_unet = outputs(host, unet, te)
    trained_te, trained_unet = recorder.outputs[1]
    assert relative_error(merged_te, trained_te) < 1e-4
    assert relative_error(merged_unet, trained_unet) < 1e-4
    plain_te, plain_unet = outputs(host, base_unet, base_te)
    assert relative_error(plain_unet, trained_unet) > 1e-4  # the network changed the model

    with safe_open(str(path), framework="pt") as reader:
        keys, metadata = set(reader.keys()), reader.metadata()
    if "tucker" in network:
        tucker_part = "hada_t1" if network.startswith("loha") else "lokr_t2"
        assert any(key.endswith(tucker_part) for key in keys)
        assert json.loads(metadata["ss_network_args"])["use_tucker"] == "True"
    if network == "dora":
        assert any(key.endswith("dora_scale") for key in keys)
        args = json.loads(metadata["ss_network_args"])
        assert args["dora_wd"] == "True" and args["wd_on_output"] == "False"
    if network in ("lora", "locon"):
        assert metadata["ss_network_module"] == "networks.lora"
    else:
        assert metadata["ss_network_module"] == "lycoris.kohya"
        assert json.loads(metadata["ss_network_args"])["algo"] == {"dora": "locon"}.get(
            network, network.split("-")[0]
        )


@pytest.mark.slow
@pytest.mark.parametrize("network", list(NETWORKS))
def test_continue_from_file_round_trips(tmp_path, network):
    host = tiny_host()
    first = train(host, tiny_config(tmp_path, epochs=1, **FAST, **NETWORKS[network]), small_source(count=2))
    saved_path = first.epochs[0].path
    saved = load_saved_network(saved_path)
    plan = plan_network(
        TrainingConfig(**NETWORKS[network]),
        host.unet(),
        host.text_encoder(),
        train_text_encoder=True,
        saved=saved,
    )
    with attached_adapters(host.unet(), host.text_encoder(), plan.targets, plan.settings) as adapters:
        adapters.load(saved.weights)
        exported = adapters.export()
    assert exported.keys() == saved.weights.keys()
    for key, parts in saved.weights.items():
        assert exported[key].keys() == parts.keys()
        for part, tensor in parts.items():
            torch.testing.assert_close(exported[key][part], tensor, rtol=0, atol=0)

    recorder = OutputsAtEpoch(host)

    class AtStart(TrainingCallbacks):
        def on_start(self, plan):
            recorder.on_epoch_saved(type("Saved", (), {"epoch": 0})())

    config = tiny_config(
        tmp_path,
        output_name="alice_more",
        epochs=1,
        network_weights=str(saved_path),
        **FAST,
        **NETWORKS[network],
    )
    assert train(host, config, small_source(count=2), AtStart()).status == "completed"
    unet, te = copy.deepcopy(host.unet()), copy.deepcopy(host.text_encoder())
    merge_with_a1111_formula(saved_path, unet, te)
    assert relative_error(outputs(host, unet, te)[1], recorder.outputs[0][1]) < 1e-4


def test_continuing_a_file_of_another_kind_is_refused(tmp_path):
    host = tiny_host()
    first = train(host, tiny_config(tmp_path, epochs=1, network_type="loha", **FAST), small_source(count=2))
    config = tiny_config(tmp_path, output_name="other", epochs=1, network_weights=str(first.epochs[0].path))
    with pytest.raises(ConfigError, match="LoHa network"):
        train(host, config, small_source())


@pytest.mark.parametrize("network", ["dora", "loha-tucker", "lokr-tucker"])
def test_every_save_precision_writes_a1111_keys_in_that_precision(tmp_path, network):
    host = tiny_host()
    config = TrainingConfig(**{"network_dim": 4, "network_alpha": 2, "conv_dim": 2, **NETWORKS[network]})
    plan = plan_network(config, host.unet(), host.text_encoder(), train_text_encoder=True)
    with attached_adapters(host.unet(), host.text_encoder(), plan.targets, plan.settings) as adapters:
        _with_random_adapters(adapters)
        modules = {kohya_format.kohya_name(c, n): parts for (c, n), parts in adapters.export().items()}
    for precision, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
        path = tmp_path / f"{network}-{precision}.safetensors"
        kohya_format.save_kohya_lora(path, modules, {"ss_network_module": "lycoris.kohya"}, precision)
        with safe_open(str(path), framework="pt") as reader:
            assert {reader.get_tensor(key).dtype for key in reader.keys()} == {dtype}  # noqa: SIM118
        merge_with_a1111_formula(path, copy.deepcopy(host.unet()), copy.deepcopy(host.text_encoder()))
        loaded, _ = kohya_format.load_network_file(path)
        assert loaded.keys() == modules.keys()
        for stem, parts in modules.items():
            for part, tensor in parts.items():
                torch.testing.assert_close(loaded[stem][part], tensor.to(dtype).float(), rtol=0, atol=0)


# --- all-or-nothing injection -------------------------------------------------------------------


@pytest.mark.parametrize("network", ["lora", "loha"])
def test_a_failure_half_way_through_injection_leaves_the_model_as_it_was(monkeypatch, network):
    from peft.tuners.loha import LoHaModel
    from peft.tuners.lora import LoraModel

    host = tiny_host()
    unet, te = host.unet(), host.text_encoder()
    before = state_fingerprint(unet, te)
    modules_before = {name: module for name, module in [*unet.named_modules(), *te.named_modules()]}
    model_class = LoraModel if network == "lora" else LoHaModel
    original = model_class._create_and_replace
    calls = []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise RuntimeError("peft failed on the 7th module")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(model_class, "_create_and_replace", failing)
    plan = plan_network(TrainingConfig(**NETWORKS[network]), unet, te, train_text_encoder=True)
    with pytest.raises(RuntimeError, match="7th module"):
        attached_adapters(unet, te, plan.targets, plan.settings, plan.dropout).__enter__()
    assert len(calls) == 7
    assert state_fingerprint(unet, te) == before
    modules_after = {name: module for name, module in [*unet.named_modules(), *te.named_modules()]}
    assert modules_after.keys() == modules_before.keys()
    assert all(modules_after[name] is module for name, module in modules_before.items())


# --- LoRA+ and block weights ---------------------------------------------------------------------


def _groups(config: TrainingConfig, host=None):
    host = host or tiny_host()
    plan = plan_network(config, host.unet(), host.text_encoder(), train_text_encoder=True)
    adapters = attached_adapters(host.unet(), host.text_encoder(), plan.targets, plan.settings)
    return host, adapters


def test_loraplus_ratio_is_in_the_optimizers_param_groups():
    config = TrainingConfig(
        network_dim=4,
        network_alpha=2,
        unet_lr=1e-3,
        text_encoder_lr=1e-4,
        loraplus_lr_ratio=16,
        loraplus_text_encoder_lr_ratio=4,
    )
    _, context = _groups(config)
    with context as adapters:
        groups = adapter_param_groups(adapters, config)
        optimizer = build_optimizer(config, groups, torch.device("cpu"))
        rates = {group["name"]: group["lr"] for group in optimizer.param_groups}
        assert rates == pytest.approx(
            {"unet": 1e-3, "unet lora+": 16e-3, "text_encoder": 1e-4, "text_encoder lora+": 4e-4}
        )
        ups = {id(p) for t, part, p in adapters.named_parameters() if part == "lora_up.weight"}
        plus = [g for g in optimizer.param_groups if g["name"].endswith("lora+")]
        assert {id(p) for g in plus for p in g["params"]} == ups


def test_block_lr_weights_make_one_group_per_block_and_zero_blocks_are_not_trained():
    config = TrainingConfig(
        network_dim=4,
        network_alpha=2,
        unet_lr=1e-3,
        down_lr_weight="sine",
        mid_lr_weight="0.5",
        up_lr_weight="0,0,0,1,1,1,1,1,1,1,1,1",
    )
    weights = block_lr_weights(config.down_lr_weight, config.mid_lr_weight, config.up_lr_weight)
    _, context = _groups(config)
    with context as adapters:
        blocks = {block_index(t.component, t.module_name) for t in adapters.targets if t.component == "unet"}
        assert not blocks & {13, 14, 15}  # OUT00-OUT02 weight 0: left out, as kohya does
        groups = {g.name: g.lr for g in adapter_param_groups(adapters, config)}
        assert groups["unet IN01"] == pytest.approx(1e-3 * weights[1])
        assert groups["unet IN08"] == pytest.approx(1e-3 * weights[8])
        assert groups["unet MID"] == pytest.approx(5e-4)
        assert groups["text_encoder"] == pytest.approx(config.text_encoder_lr)
        assert weights[1] < weights[8]  # sine rises through the down blocks


def test_block_dims_change_the_ranks():
    dims = ["4"] * 25
    dims[1], dims[12], dims[20] = "2", "6", "0"
    config = TrainingConfig(network_dim=4, network_alpha=2, block_dims=",".join(dims))
    host = tiny_host()
    plan = plan_network(config, host.unet(), host.text_encoder(), train_text_encoder=True)
    ranks = {}
    for target in plan.targets:
        ranks.setdefault(block_index(target.component, target.module_name), set()).add(target.rank)
    assert ranks[1] == {2} and ranks[12] == {6} and ranks[4] == {4} and 20 not in ranks
    with attached_adapters(host.unet(), host.text_encoder(), plan.targets) as adapters:
        layer = dict((t.module_name, layer) for t, layer in adapters.layers())
        down = adapters.kind.parameters(layer["input_blocks.1.1.proj_in"])["lora_down.weight"]
        assert down.shape[0] == 2


# --- dropout --------------------------------------------------------------------------------------


def _with_random_adapters(adapters, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, parameter in adapters.named_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


@pytest.mark.parametrize(
    "dropout",
    [
        dict(network_dropout=0.5),
        dict(rank_dropout=0.5),
        dict(module_dropout=0.5),
        dict(network_type="loha", rank_dropout=0.5),
    ],
)
def test_dropout_acts_in_training_only_and_changes_nothing_saved(dropout):
    host = tiny_host()
    config = TrainingConfig(network_dim=4, network_alpha=2, **dropout)
    plan = plan_network(config, host.unet(), host.text_encoder(), train_text_encoder=True)
    plain_plan = plan_network(
        TrainingConfig(network_dim=4, network_alpha=2, network_type=config.network_type),
        host.unet(),
        host.text_encoder(),
        train_text_encoder=True,
    )
    latents, timesteps, _ = fixed_inputs(host)
    context = torch.randn(2, 77, host.text_encoder().config.hidden_size)
    with attached_adapters(
        host.unet(), host.text_encoder(), plain_plan.targets, plain_plan.settings
    ) as plain:
        _with_random_adapters(plain)
        with torch.no_grad():
            expected = host.unet()(latents, timesteps, context=context)
    with attached_adapters(
        host.unet(), host.text_encoder(), plan.targets, plan.settings, plan.dropout
    ) as adapters:
        _with_random_adapters(adapters)
        before = adapters.export()
        torch.manual_seed(1)
        first = host.unet()(latents, timesteps, context=context).detach()  # training mode, autograd on
        second = host.unet()(latents, timesteps, context=context).detach()
        assert relative_error(first, expected) > 1e-4 and relative_error(first, second) > 1e-4
        with torch.no_grad():  # samples between epochs
            torch.testing.assert_close(host.unet()(latents, timesteps, context=context), expected)
        adapters.train(False)
        torch.testing.assert_close(host.unet()(latents, timesteps, context=context).detach(), expected)
        after = adapters.export()
    for key, parts in before.items():
        for part, tensor in parts.items():
            assert torch.equal(after[key][part], tensor)


def test_module_dropout_skips_whole_modules():
    host = tiny_host()
    config = TrainingConfig(network_dim=4, network_alpha=2, module_dropout=0.999999, train_text_encoder=False)
    plan = plan_network(config, host.unet(), host.text_encoder(), train_text_encoder=False)
    latents, timesteps, _ = fixed_inputs(host)
    context = torch.randn(2, 77, host.text_encoder().config.hidden_size)
    with torch.no_grad():
        base = host.unet()(latents, timesteps, context=context)
    with attached_adapters(
        host.unet(), host.text_encoder(), plan.targets, plan.settings, plan.dropout
    ) as adapters:
        _with_random_adapters(adapters)
        skipped = host.unet()(latents, timesteps, context=context).detach()  # every module skipped
        with torch.no_grad():
            adapted = host.unet()(latents, timesteps, context=context)
    torch.testing.assert_close(skipped, base)
    assert relative_error(adapted, base) > 1e-4


# --- scale_weight_norms ---------------------------------------------------------------------------


def test_scale_weight_norms_scales_exactly_the_modules_over_the_maximum(caplog):
    host = tiny_host()
    config = TrainingConfig(network_dim=4, network_alpha=2, network_type="locon")
    plan = plan_network(config, host.unet(), host.text_encoder(), train_text_encoder=True)
    with attached_adapters(host.unet(), host.text_encoder(), plan.targets, plan.settings) as adapters:
        _with_random_adapters(adapters)
        norms = {t: float(adapters.kind.delta_weight(layer).norm()) for t, layer in adapters.layers()}
        limit = sorted(norms.values())[len(norms) // 2]
        over = {t for t, norm in norms.items() if norm > limit}
        with caplog.at_level("INFO"):
            result = scale_weight_norms(adapters, limit)
        assert result.keys_scaled == len(over) > 0
        assert f"keys scaled {len(over)}" in caplog.text
        after = {t: float(adapters.kind.delta_weight(layer).norm()) for t, layer in adapters.layers()}
        for target, norm in norms.items():
            assert after[target] == pytest.approx(limit if target in over else norm, rel=1e-5)
        assert result.max_norm == pytest.approx(limit, rel=1e-5)


def test_loop_applies_loraplus_and_max_norm_and_records_them(tmp_path):
    host = tiny_host()
    config = tiny_config(
        tmp_path,
        epochs=1,
        loraplus_lr_ratio=8,
        scale_weight_norms=1e-4,
        network_dropout=0.1,
        down_lr_weight="linear+0.5",
        **FAST,
    )
    result = train(host, config, small_source(count=2))
    assert result.status == "completed", result.message
    modules, metadata = kohya_format.load_network_file(result.epochs[0].path)
    assert metadata["ss_scale_weight_norms"] == "0.0001"
    assert metadata["ss_network_dropout"] == "0.1"
    args = json.loads(metadata["ss_network_args"])
    assert args["loraplus_lr_ratio"] == "8.0" and args["down_lr_weight"] == "linear+0.5"
    for parts in modules.values():  # every update held to the maximum
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        delta = (up.flatten(1) @ down.flatten(1)) * parts["alpha"] / down.shape[0]
        assert float(delta.norm()) <= 1e-4 * 1.001


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(network_type="loha", dora_wd=True), "DoRA"),
        (dict(use_tucker=True), "Tucker"),
        (dict(network_dropout=1.0), "network_dropout"),
        (dict(network_type="lokr", network_dropout=0.1), "LoHa and LoKr take"),
        (dict(loraplus_lr_ratio=-1), "loraplus_lr_ratio"),
        (dict(down_lr_weight="1,2,x"), "down_lr_weight"),
        (dict(down_lr_weight="waves"), "down_lr_weight"),
        (dict(block_dims="4,4"), "block_dims needs 25"),
        (dict(scale_weight_norms=-1), "scale_weight_norms"),
        (dict(lokr_factor=0), "LoKr factor"),
    ],
)
def test_bad_network_options_get_clear_messages(overrides, message):
    problems = validate(TrainingConfig(**overrides), need_dataset=False)
    assert any(message in problem for problem in problems), problems
