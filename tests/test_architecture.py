"""Architecture: settings resolved once per strategy (no process group), the public module
seams, placement shared by USP and WallFacer, and the package's import graph."""
import ast
from pathlib import Path

import pytest

import seqpar
from checks.arch import (
    create_subgroups,
    gloo_threads_and_groups,
    init_validity,
    module_exactness,
    ulysses_module_exactness,
    usp_placement,
)
from seqpar.attention import STRATEGIES, get_strategy, registry
from seqpar.testing.checks import attention_exactness
from seqpar.train import TrainConfig

PACKAGE = Path(seqpar.__file__).parent


# -- resolve: one place per strategy -------------------------------------------------------------
@pytest.mark.parametrize("strategy,kwargs,message", [
    ("allgather", {"ring": 2}, "does not use ring=2"),          # accepted silently before
    ("local", {"offload": True}, "does not use offload=True"),  # accepted silently before
    ("ring", {"chunks": 2}, "does not use chunks=2"),
    ("ulysses", {"team_size": 2}, "does not use team_size=2"),
    ("usp", {"placement": "nodes"}, "unknown placement 'nodes'"),
    ("fpdt", {"layout": "zigzag"}, "needs layout='contiguous'"),
    ("lss", {"layout": "striped"}, "segments"),
    ("wallfacer", {"team_size": 3}, "team_size=3 does not divide 4 ranks"),
    ("usp", {"ulysses": 3}, "ulysses=3 does not divide 4"),
    ("fpdt", {"chunks": 0}, "chunks must be >= 1"),
])
def test_resolve_rejects_without_a_process_group(strategy, kwargs, message):
    with pytest.raises(ValueError, match=None) as info:
        seqpar.resolve(strategy, 4, **kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize("strategy,layout,degrees", [
    ("ring", "zigzag", {"ring": 4}), ("ulysses", "contiguous", {"ulysses": 4}),
    ("usp", "zigzag", {"ulysses": 1, "ring": 4}), ("allgather", "zigzag", {}),
    ("wallfacer", "zigzag", {"team_size": 2}), ("lss", "zigzag", {}),
    ("fpdt", "contiguous", {"ulysses": 4, "chunks": 1}),
])
def test_each_strategy_owns_its_defaults(strategy, layout, degrees):
    s = seqpar.resolve(strategy, 4)
    assert s.layout.kind == layout and s.strategy == strategy
    assert {k: getattr(s, k) for k in degrees} == degrees
    assert seqpar.resolve(strategy, 4, **s.init_kwargs()) == s  # settings round-trip through init kwargs


def test_the_teams_alias_is_gone():
    """`teams` was team_size's deprecated alias: now an unknown option like any other."""
    s = seqpar.resolve("wallfacer", 16, team_size=4)
    assert s.team_size == 4 and s.layout.outer == 4 and s.layout.inner == 4
    with pytest.raises(ValueError, match=r"does not take option\(s\) \['teams'\]"):
        seqpar.resolve("wallfacer", 16, teams=4)


def test_double_gradient_averaging_is_a_strategy_attribute():
    assert [n for n in STRATEGIES if get_strategy(n).double_grad_averaging] == ["lss"]


def test_trainer_asks_the_strategy_for_its_defaults():
    """`seqpar train --strategy fpdt` failed with the trainer's zigzag default; now the strategy's
    default layout applies, and only an explicit incompatible choice errors."""
    TrainConfig.of(strategy="fpdt", chunks=2, seq_len=64).validate(4)
    with pytest.raises(ValueError, match="needs layout='contiguous'"):
        TrainConfig.of(strategy="fpdt", layout="zigzag", seq_len=64).validate(4)
    assert TrainConfig().strategy_settings(4).team_size == 2  # WallFacer's own default


# -- a strategy from outside the package -----------------------------------------------------------
@pytest.fixture
def gather_all(monkeypatch):
    """tests/checks/custom_strategy.py's strategy registered in this process for one test only."""
    from checks import custom_strategy
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    custom_strategy.register_gather_all()
    return custom_strategy


@pytest.mark.parametrize("causal", [False, True])
def test_a_strategy_registered_outside_the_package_runs_everywhere(worlds, gather_all, causal):
    """Registered like a user's: seqpar.init / resolve take it (with its own extra option, and the
    same errors as any strategy), the planner enumerates and models it, and its bytes equal its
    cost model's on a real world."""
    from seqpar.plan import Cluster, ModelShape, PlanInput, attention_bytes, candidate_configs, planned_strategies
    assert "gather_all" in seqpar.STRATEGIES and "gather_all" in planned_strategies()
    settings = seqpar.resolve("gather_all", 4, label="mine")
    assert settings.layout.kind == "contiguous" and settings.extra("label") == "mine"
    with pytest.raises(ValueError, match="does not use ulysses=2"):
        seqpar.resolve("gather_all", 4, ulysses=2)
    with pytest.raises(ValueError, match=r"does not take option\(s\) \['colour'\]"):
        seqpar.resolve("gather_all", 4, colour="red")
    results = worlds.run(4, gather_all.exactness_and_bytes, causal)
    for r in results:
        assert max(r[f] for f in ("out", "lse", "dq", "dk", "dv")) < 1e-10, r
        assert r["describe"]["strategy"] == "gather_all" and r["describe"]["label"] == "mine"
    inp = PlanInput(Cluster(4, ranks_per_node=4), ModelShape(1, 32, 4, 2, 64, 256), 32, 1, "float32", causal)
    (cfg,) = candidate_configs(inp, ["gather_all"], tp=(1,), pp=(1,))
    assert [attention_bytes(inp, cfg, rank) for rank in range(4)] == [r["sent"] for r in results]


# -- the modules ------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_ulysses_wraps_any_local_attention(worlds, causal, kv_heads):
    for r in worlds.run(4, ulysses_module_exactness, causal, kv_heads=kv_heads):
        assert max(r.values()) < 1e-10, r


@pytest.mark.parametrize("strategy,kwargs", [("ring", {}), ("usp", {"ulysses": 2}), ("wallfacer", {}),
                                             ("fpdt", {"chunks": 2}), ("allgather", {"layout": "striped"})])
def test_strategy_as_module(worlds, strategy, kwargs):
    for r in worlds.run(4, module_exactness, strategy, kwargs, True):
        assert max(r[k] for k in ("out", "dq", "dk", "dv")) < 1e-10, r
        assert r["repr"].startswith("SequenceParallelAttention(") and f"strategy={strategy}" in r["repr"]


# -- placement: one mechanism for USP and WallFacer -----------------------------------------------
def test_usp_placement_groups(worlds):
    low = worlds.run(4, usp_placement, "collectives_intra")
    high = worlds.run(4, usp_placement, "rings_intra")
    assert [r["ulysses_group"] for r in low] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["ring_group"] for r in low] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [r["ring_group"] for r in high] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["ulysses_group"] for r in high] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [r["layout_rank"] for r in high] == [0, 2, 1, 3]


@pytest.mark.parametrize("causal", [False, True])
def test_usp_rings_intra_is_exact(worlds, causal):
    for r in worlds.run(4, attention_exactness, "usp", {"ulysses": 2, "placement": "rings_intra"}, causal=causal,
                        seq=32):
        assert max(r[f] for f in ("out", "lse", "dq", "dk", "dv")) < 1e-10, r


# -- the package's shape ------------------------------------------------------------------------
# Imports inside function bodies hide dependencies from the module headers. Each one left must
# guard an optional extra (the module imports without it) and say which; at most MAX_LATE_IMPORTS.
LATE_IMPORTS = {
    ("seqpar.export", "seqpar.hf"): "transformers (the `hf` extra): only a run of an HF model exports through it",
    ("seqpar.train.sections", "seqpar.hf"): "transformers (the `hf` extra): --hf-model's shape",
    ("seqpar.train.launch", "seqpar.hf"): "transformers (the `hf` extra): --hf-model's vocabulary",
    ("seqpar.train.tasks", "seqpar.hf"): "transformers (the `hf` extra): --hf-model's model and tokenizer",
}
MAX_LATE_IMPORTS = 15


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(seqpar module, at module level?) for every import in the file: function bodies and
    TYPE_CHECKING blocks included (they are dependencies too), module level = the file's own
    top-level statements."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            modules = [f"{target}.{a.name}" for a in node.names if _exists(f"{target}.{a.name}")]
            # `from pkg import submodule` needs the submodule, not what pkg/__init__ defines
            candidates = modules if len(modules) == len(node.names) else [target, *modules]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        out += [(c, id(node) in top) for c in candidates if c.startswith("seqpar") and _exists(c)]
    return out


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    """Every seqpar module -> the seqpar modules it imports anywhere in its file."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        graph[name] = {m for m, _ in _imports(path) if m != name}
    return graph


def test_import_graph_has_no_cycle():
    """No cycle, counting imports inside functions and TYPE_CHECKING blocks as well."""
    graph, state, stack = _graph(), {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node] & graph.keys()):
            if state.get(dep) == "open":
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_late_imports_guard_optional_extras_only():
    late = sorted({(_module_name(p), m) for p in PACKAGE.rglob("*.py") for m, top in _imports(p)
                   if not top and m != _module_name(p)})
    late_statements = sum(1 for p in PACKAGE.rglob("*.py") for m, top in _imports(p) if not top)
    unexplained = [pair for pair in late if pair not in LATE_IMPORTS]
    assert not unexplained, f"imports inside functions without a reason: {unexplained}"
    assert late_statements <= MAX_LATE_IMPORTS, late_statements


def test_layers_import_downwards():
    graph = _graph()
    frontends = ("seqpar.testing", "seqpar.verify")  # seqpar verify is the command line of seqpar.testing
    assert not any(m.startswith("seqpar.testing") for name, deps in graph.items()
                   if not name.startswith(frontends) for m in deps), "library code imports seqpar.testing"
    for low in ("seqpar.kernels", "seqpar.layout", "seqpar.documents", "seqpar.comm", "seqpar.mesh"):
        assert not any(d.startswith(("seqpar.attention", "seqpar.context", "seqpar.train", "seqpar.plan"))
                       for d in graph[low]), low
    assert not any(d.startswith(("seqpar.context", "seqpar.model", "seqpar.plan", "seqpar.train"))
                   for name, deps in graph.items() if name.startswith("seqpar.attention") for d in deps)


def test_modules_stay_small_or_say_why():
    for path in PACKAGE.rglob("*.py"):
        lines = path.read_text().splitlines()
        if len(lines) > 420:
            head = "\n".join(lines[:30])
            assert "Size:" in head, f"{path.relative_to(PACKAGE)} has {len(lines)} lines and no 'Size:' reason"


# -- the planner and seqpar.init agree on validity ------------------------------------------------
@pytest.mark.parametrize("seq,heads,kv_heads", [(64, 8, 2), (24, 4, 4), (36, 6, 2)])
def test_plan_and_init_agree_on_every_candidate(worlds, seq, heads, kv_heads):
    """Every candidate the planner enumerates on 4 ranks: valid in `seqpar plan` exactly when
    seqpar.init + one attention call accept it, with the same reason when not."""
    from seqpar.plan import Cluster, ModelShape, PlanInput, candidate_configs, evaluate

    inp = PlanInput(Cluster(4, ranks_per_node=2), ModelShape(2, heads * 8, heads, kv_heads, 64, 256), seq, 1,
                    "float32", True)
    candidates = candidate_configs(inp, tp=(1,), pp=(1,))  # sequence parallelism over the whole world
    planned = [evaluate(inp, c) for c in candidates]
    actual = worlds.run(4, init_validity, [(c.strategy, c.init_kwargs()) for c in candidates], seq=seq,
                        heads=heads, kv_heads=kv_heads)
    assert actual[0] == actual[-1]
    for cand, got in zip(planned, actual[0]):
        assert cand.valid == (got == ""), f"{cand.config.label}: plan says {cand.reason!r}, init says {got!r}"
        if not cand.valid:
            assert cand.reason == got, cand.config.label
    assert any(c.valid for c in planned)


def test_a_reused_world_drops_the_groups_each_task_made(worlds):
    """Every gloo group holds an event-loop thread and two workers: a world reused by hundreds of
    tasks must not keep them (they woke idle workers and slowed every later test)."""
    before = worlds.run(2, gloo_threads_and_groups)
    during = worlds.run(2, create_subgroups, 5)
    after = worlds.run(2, gloo_threads_and_groups)
    assert [groups for _, groups in before] == [n - 5 for n in during]
    assert after == before
