import pytest
import torch

from comigs_hf.algorithms import PCL, STRATEGIES, Centralized, FDLoRAFusion, FedProx, HetLoRA, get_strategy
from comigs_hf.ranks import lora_ranks, payload_bytes, payload_parameters
from comigs_hf.strategies import Strategy, aggregation_weights, partition_state_dict
from comigs_hf.transports.hub import check_hub_strategy

GENERALIST_A = "model.transformer.h.0.mlp.c_fc.lora_A.generalist_0.weight"
GENERALIST_B = "model.transformer.h.0.mlp.c_fc.lora_B.generalist_0.weight"
ATTENTION_A = "model.transformer.h.0.attn.c_attn.lora_A.attention.weight"
SPECIALIST_A = "model.transformer.h.0.mlp.c_fc.lora_A.specialist_0.weight"
SPECIALIST_B = "model.transformer.h.0.mlp.c_fc.lora_B.specialist_1.weight"
ROUTER = "model.transformer.h.0.mlp.router.weight"
BASE_LINEAR = "model.transformer.h.0.mlp.c_fc.base_layer.weight"
BASE_EMBEDDING = "model.transformer.wte.weight"


def role_of(name: str) -> str:
    """The naming contract of `comigs_hf.modeling_comigs.parameter_role`, restated so these tests stand alone."""
    if ".router." in name:
        return "router"
    if ".generalist_" in name or ".attention." in name:
        return "generalist"
    if ".specialist_" in name:
        return "specialist"
    return "base"


def fake_state() -> dict[str, torch.Tensor]:
    names = [BASE_EMBEDDING, BASE_LINEAR, GENERALIST_A, GENERALIST_B, ATTENTION_A, SPECIALIST_A, SPECIALIST_B, ROUTER]
    return {name: torch.full((2, 3), float(index)) for index, name in enumerate(names)}


def test_local_shares_nothing():
    shared, private = partition_state_dict(fake_state(), get_strategy("local"), role_of=role_of)
    assert shared == {}
    assert list(private) == [GENERALIST_A, GENERALIST_B, ATTENTION_A, SPECIALIST_A, SPECIALIST_B, ROUTER]


def test_comigs_shares_only_generalists():
    shared, private = partition_state_dict(fake_state(), get_strategy("comigs"), role_of=role_of)
    # the attention adapter has the generalist role, so it travels with the generalists
    assert list(shared) == [GENERALIST_A, GENERALIST_B, ATTENTION_A]
    assert list(private) == [SPECIALIST_A, SPECIALIST_B, ROUTER]


def test_fedavg_shares_every_expert_but_has_no_router_to_share():
    shared, private = partition_state_dict(fake_state(), get_strategy("fedavg"), role_of=role_of)
    assert list(shared) == [GENERALIST_A, GENERALIST_B, ATTENTION_A, SPECIALIST_A, SPECIALIST_B]
    assert list(private) == [ROUTER]
    assert get_strategy("fedavg").expert_mixing == "uniform"


def test_fedavg_all_shares_every_expert_and_the_router():
    shared, private = partition_state_dict(fake_state(), get_strategy("fedavg_all"), role_of=role_of)
    assert list(shared) == [GENERALIST_A, GENERALIST_B, ATTENTION_A, SPECIALIST_A, SPECIALIST_B, ROUTER]
    assert private == {}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_base_tensors_appear_in_neither_part(name):
    shared, private = partition_state_dict(fake_state(), get_strategy(name), role_of=role_of)
    for part in (shared, private):
        assert BASE_EMBEDDING not in part
        assert BASE_LINEAR not in part


def test_partition_returns_the_input_tensors_without_copying():
    state = fake_state()
    shared, private = partition_state_dict(state, get_strategy("comigs"), role_of=role_of)
    assert shared[GENERALIST_A] is state[GENERALIST_A]
    assert private[ROUTER] is state[ROUTER]


def test_unknown_role_is_rejected_naming_the_parameter():
    with pytest.raises(ValueError, match="'odd.weight' has role 'mystery'"):
        partition_state_dict({"odd.weight": torch.zeros(1)}, get_strategy("comigs"), role_of=lambda name: "mystery")


def test_default_role_function_follows_the_modeling_contract():
    modeling = pytest.importorskip("comigs_hf.modeling_comigs")
    assert hasattr(modeling, "parameter_role")
    shared, private = partition_state_dict(fake_state(), get_strategy("comigs"))
    assert list(shared) == [GENERALIST_A, GENERALIST_B, ATTENTION_A]
    assert list(private) == [SPECIALIST_A, SPECIALIST_B, ROUTER]


@pytest.mark.parametrize(
    ("shared_roles", "requires_equal_experts"),
    [
        (set(), False),
        ({"generalist"}, False),
        ({"specialist"}, True),
        ({"router"}, True),
        ({"generalist", "specialist", "router"}, True),
    ],
)
def test_equal_experts_are_required_exactly_when_specialists_or_router_are_shared(
    shared_roles, requires_equal_experts
):
    assert Strategy("custom", shared_roles).requires_equal_experts is requires_equal_experts


# preset -> (roles that leave a client, how the router trains): the reference code's methods and baselines
PRESETS = {
    "comigs": ({"generalist"}, "validation"),
    "comigs_tr": ({"generalist"}, "train"),
    "comigs_2s": (set(), "validation"),
    "local": (set(), "none"),
    "fedavg": ({"generalist", "specialist"}, "none"),
    "pfedmoe": ({"generalist"}, "joint"),
    "local_moe": (set(), "joint"),
    "local_moe_train": (set(), "train"),
    "fedavg_moe": ({"generalist", "specialist"}, "joint"),
    "fedavg_moe_train": ({"generalist", "specialist"}, "train"),
    "fedavg_all": ({"generalist", "specialist", "router"}, "validation"),
    "centralized": (set(), "none"),
    "ffa_lora": ({"generalist", "specialist"}, "none"),
    "fedsa_lora": ({"generalist", "specialist"}, "none"),
    "flexlora": ({"generalist"}, "none"),
    "hetlora": ({"generalist"}, "none"),
    "pcl": ({"generalist", "specialist"}, "none"),
    "fd_lora": ({"generalist"}, "none"),
    "fedprox": ({"generalist", "specialist"}, "none"),
}
# the presets that need an algorithm of their own, and its settings
ALGORITHMS = {
    "hetlora": HetLoRA(strength=0.99, coef=0.005),
    "pcl": PCL(from_round=5, every=2),
    "fd_lora": FDLoRAFusion(budget=10, l1=0.05, bound=1.0),
    "centralized": Centralized(),
    "fedprox": FedProx(mu=0.01),
}
# the baselines with their own server rule; the others average
RULES = {"flexlora": "product_svd", "hetlora": "norm_weighted_mean"}
# the federated-LoRA baselines that send one factor: (shared_factors, frozen_factors); the others send both
ONE_FACTOR = {"ffa_lora": ({"lora_B"}, {"lora_A"}), "fedsa_lora": ({"lora_A"}, set())}


def test_presets_are_as_documented():
    assert set(STRATEGIES) == set(PRESETS)
    for name, (roles, router_training) in PRESETS.items():
        assert (STRATEGIES[name].shared_roles, STRATEGIES[name].router_training) == (roles, router_training), name
        assert STRATEGIES[name].expert_mixing == ("uniform" if router_training == "none" else "router")
    assert not any("router" in s.shared_roles for s in STRATEGIES.values() if s.name != "fedavg_all")
    assert {name: s.algorithms for name, s in STRATEGIES.items() if s.algorithms} == {
        name: (algorithm,) for name, algorithm in ALGORITHMS.items()
    }
    assert {name: s.aggregation for name, s in STRATEGIES.items() if s.aggregation != "weighted_mean"} == RULES
    # PCL alone has no server: from round 5, every 2 rounds, each client combines every client's experts
    assert [name for name, s in STRATEGIES.items() if not s.server_combines] == ["pcl"]
    assert [r for r in range(1, 12) if PCL().combines_in_round(r)] == [5, 7, 9, 11]
    assert all(strategy.weighting == "train_tokens" for strategy in STRATEGIES.values())
    for name, strategy in STRATEGIES.items():
        factors = ONE_FACTOR.get(name, ({"lora_A", "lora_B"}, set()))
        assert (strategy.shared_factors, strategy.frozen_factors) == factors, name


def test_strategy_is_frozen_hashable_and_freezes_its_roles():
    strategy = Strategy("custom", ["generalist"])
    assert strategy.shared_roles == frozenset({"generalist"})
    assert hash(strategy) == hash(Strategy("custom", {"generalist"}))
    with pytest.raises(AttributeError):
        strategy.name = "other"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shared_roles": {"base"}}, r"shared_roles contains \['base'\]"),
        (
            {"shared_roles": set(), "aggregation": "median"},
            "unknown aggregation 'median'; known: coordinate_median, krum, norm_weighted_mean, product_svd",
        ),
        (
            {"shared_roles": set(), "weighting": "by_size"},
            "unknown weighting 'by_size'; known: train_tokens, capped_train_tokens, uniform",
        ),
        ({"shared_roles": set(), "shared_factors": {"lora_C"}}, r"shared_factors contains \['lora_C'\]"),
        ({"shared_roles": {"generalist"}, "shared_factors": set()}, "shares roles but no LoRA factor of them"),
        ({"shared_roles": set(), "frozen_factors": {"lora_A", "lora_B"}}, "freezes both LoRA factors"),
    ],
)
def test_strategy_rejects_unknown_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Strategy("custom", **kwargs)


def test_unknown_strategy_lists_the_known_ones():
    with pytest.raises(
        ValueError,
        match="Unknown strategy 'scaffold'; known: centralized, comigs, comigs_2s, comigs_tr, fd_lora, fedavg, ",
    ):
        get_strategy("scaffold")


def test_payload_bytes_sums_numel_times_element_size():
    state = {"a": torch.zeros(2, 3, dtype=torch.float32), "b": torch.zeros(4, dtype=torch.bfloat16)}
    assert payload_bytes(state) == 2 * 3 * 4 + 4 * 2
    assert payload_bytes({}) == 0


def test_local_strategy_sends_zero_bytes():
    shared, _ = partition_state_dict(fake_state(), get_strategy("local"), role_of=role_of)
    assert payload_bytes(shared) == 0


def test_weights_follow_train_tokens_unless_uniform():
    assert aggregation_weights(get_strategy("comigs"), [100, 300]) == [100.0, 300.0]
    uniform = Strategy("uniform", {"generalist"}, weighting="uniform")
    assert aggregation_weights(uniform, [100, 300]) == [1.0, 1.0]


def test_a_strategy_sharing_one_lora_factor_partitions_by_factor_and_the_hub_refuses_it():
    state = {
        "model.model.transformer.h.0.mlp.base_mlp.c_fc.lora_A.generalist_0.weight": torch.zeros(1),
        "model.model.transformer.h.0.mlp.base_mlp.c_fc.lora_B.generalist_0.weight": torch.zeros(1),
        "model.model.transformer.h.0.mlp.router.weight": torch.zeros(1),
    }
    names = list(state)
    shared, private = partition_state_dict(state, get_strategy("ffa_lora"))
    assert list(shared) == [names[1]] and list(private) == [names[0], names[2]]
    shared, private = partition_state_dict(state, get_strategy("fedsa_lora"))
    assert list(shared) == [names[0]] and list(private) == [names[1], names[2]]
    with pytest.raises(ValueError, match="publish whole PEFT adapters, but strategy 'b_only' shares only lora_B"):
        check_hub_strategy(Strategy(name="b_only", shared_roles={"generalist"}, shared_factors={"lora_B"}))


@pytest.mark.parametrize(
    ("algorithm", "fields", "message"),
    [
        (HetLoRA(strength=1.0), {}, "HetLoRA's strength must be in"),
        (HetLoRA(strength=0), {}, "HetLoRA's strength must be in"),
        (HetLoRA(strength=0.9, coef=-1), {}, "rank_pruning_coef must be a finite number"),
        (HetLoRA(strength=0.9, coef=float("inf")), {}, "rank_pruning_coef must be a finite number"),
        (FDLoRAFusion(budget=10), {}, "fusion needs router_training 'none'"),
        (FDLoRAFusion(budget=-1), {"router_training": "none"}, "fusion budget must be an integer >= 1"),
        (FDLoRAFusion(budget=10, l1=-0.1), {"router_training": "none"}, "l1 must be finite and >= 0"),
        (PCL(every=0), {}, "PCL's every must be an integer >= 1"),
        (FedProx(mu=-1.0), {}, "FedProx's mu must be a finite number >= 0"),
        (Centralized(), {}, "pools the clients into one, so it has nobody to share with"),
    ],
)
def test_bad_algorithm_settings_fail_at_construction(algorithm, fields, message):
    with pytest.raises(ValueError, match=message):
        Strategy("custom", {"generalist"}, algorithms=(algorithm,), **fields)


def test_a_pruning_coefficient_without_pruning_is_refused_naming_the_strategy():
    with pytest.raises(ValueError, match="rank_pruning_coef=0.1 regularises .* strategy prunes no rank"):
        get_strategy("comigs", rank_pruning_coef=0.1)
    assert get_strategy("comigs", rank_pruning_coef=0.0).algorithms == ()


def test_recipe_sweeps_hetlora_regulariser_through_get_strategy():
    assert get_strategy("hetlora", rank_pruning_coef=0.05).algorithms == (HetLoRA(strength=0.99, coef=0.05),)
    assert get_strategy("hetlora").algorithms == (HetLoRA(strength=0.99, coef=0.005),)


def test_lora_ranks_count_the_leading_slices_a_client_uses():
    a, b = torch.ones(4, 3), torch.ones(5, 4)
    a[2:], b[:, 2:] = 0, 0
    state = {GENERALIST_A: a, GENERALIST_B: b, ROUTER: torch.ones(2, 3)}
    assert lora_ranks(state) == {GENERALIST_A: 2}
    # rank 2 of 4: 2 x 3 of A and 5 x 2 of B, the router whole
    assert payload_parameters(state, lora_ranks(state))["total"] == 6 + 10 + 6
    assert payload_bytes(state, lora_ranks(state)) == 4 * (6 + 10 + 6)
    assert payload_parameters(state)["total"] == 12 + 20 + 6
    # one factor alone (FFA-LoRA's B) is counted whole: its zeros say nothing about the rank
    assert lora_ranks({GENERALIST_B: b}) == {}
