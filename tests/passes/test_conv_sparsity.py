"""conv_sparsity and conv_profile: 1x1 conv sites, structure (what the graph becomes), numerics (against
the dense model with the same weights pruned by hand), counts and refusals, replay, plan checks."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import sparsegraph as sg
from sparsegraph import ir, meta, models
from sparsegraph.codegen.sparse_conv1x1 import OP
from sparsegraph.errors import PlanEntryError
from sparsegraph.measure import cosine
from sparsegraph.passes.rewrite.conv_sparsity import ConvSparsity, _from_hex
from sparsegraph.report import sites_table

# heavy for the default run (kept under 6 minutes on 2 cores): CI runs these after it
pytestmark = [pytest.mark.slow, pytest.mark.ci]

TOL = {"rtol": 1e-5, "atol": 1e-5}


class TinyCNN(torch.nn.Module):
    """An inverted residual block with its stem and head: three 1x1 sites (expand: norm + ReLU6; project:
    norm, into a residual add; head: bias + ReLU, no norm) and three convolutions that are not (a strided
    3x3 stem, a depthwise 3x3, a strided 1x1)."""

    def __init__(self):
        super().__init__()
        conv, bn = torch.nn.Conv2d, torch.nn.BatchNorm2d
        self.stem, self.bn0 = conv(3, 8, 3, stride=2, padding=1, bias=False), bn(8)
        self.expand, self.bn1 = conv(8, 24, 1, bias=False), bn(24)
        self.dw, self.bn2 = conv(24, 24, 3, padding=1, groups=24, bias=False), bn(24)
        self.project, self.bn3 = conv(24, 8, 1, bias=False), bn(8)
        self.down = conv(8, 13, 1, stride=2)
        self.head = conv(13, 40, 1)
        self.fc = torch.nn.Linear(40, 10, bias=False)

    def forward(self, x):
        x = F.relu6(self.bn0(self.stem(x)))
        y = F.relu6(self.bn1(self.expand(x)))
        y = F.relu6(self.bn2(self.dw(y)))
        x = x + self.bn3(self.project(y))
        x = F.relu(self.head(F.relu(self.down(x))))
        return self.fc(x.mean((2, 3)))


def _tiny() -> TinyCNN:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = TinyCNN()
        for m in model.modules():  # statistics and affine parameters a fold has to get right
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.3, 0.3)
        return model.eval()


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


X = _images(3, 0)
CALIBRATION = [(_images(4, s),) for s in (1, 2)]


def _compile(model=None, example=(X,), calibration=CALIBRATION, **options):
    return sg.compile(model or _tiny(), {"passes": ["conv_profile", {"conv_sparsity": options}]},
                      example_inputs=example, calibration=calibration, quiet=True)


def _pruned_by_hand(model, plan):
    """A copy of `model` with each rewritten conv's dropped weights zeroed and its bias shifted by the
    decision's δ: the dense model the sparse graph must equal."""
    pruned = copy.deepcopy(model)
    modules = dict(pruned.named_modules())
    for site, per_pass in plan.sites.items():
        d = per_pass.get("conv_sparsity", {}).get("decision")
        if d is None:
            continue
        conv = modules[site.removeprefix("conv:")]
        kept = _from_hex(d["kept"], conv.in_channels).repeat_interleave(d["block"], 0)[: conv.out_channels]
        with torch.no_grad():
            conv.weight[~kept] = 0
            if d["bias_shift"]:
                shift = torch.tensor(d["bias_shift"], dtype=torch.float32)
                conv.bias = torch.nn.Parameter(shift if conv.bias is None else conv.bias + shift)
    return pruned


def test_the_graph_s_1x1_convolutions_are_sites_with_their_facts():
    gm = sg.trace(_tiny(), (X,))
    sites = ir.conv_sites(gm)
    assert [s.id for s in sites] == ["conv:expand", "conv:project", "conv:head"]
    facts = [(s.in_channels, s.out_channels, s.height, s.width) for s in sites]
    assert facts == [(8, 24, 8, 8), (24, 8, 8, 8), (13, 40, 4, 4)]
    expand, project, head = sites
    assert expand.norm is not None and expand.bounds == (0.0, 6.0)  # batch norm and ReLU6 to fold
    assert project.norm is not None and project.act is None  # its output goes into the residual add
    assert head.norm is None and head.bounds == (0.0, None) and head.bias is not None
    assert [s.layer for s in sites] == [0, 1, 2] and [s for s in ir.sites(gm) if isinstance(s, ir.ConvSite)]
    assert meta.get(head.conv).role == "conv.1x1" and meta.get(head.conv).site == "conv:head"
    table = sites_table(gm)
    assert "conv:project" in table and "1x1 conv 24→8 at 8×8" in table and "3 sites" in table
    described = {s["id"]: s for s in sg.plan.describe_sites(gm)}
    assert described["conv:head"] == {"id": "conv:head", "kind": "conv", "layer": 2, "module_path": "head",
                                      "in_channels": 13, "out_channels": 40, "height": 4, "width": 4}


def test_counts_and_refusals_name_each_convolution():
    stats = _compile(target=0.5).plan.passes["conv_sparsity"]["stats"]
    assert stats["matched"] == 6 and stats["rewritten"] == 2
    reasons = {r["site"]: r["reason"] for r in stats["refused"]}
    assert reasons["conv:expand"] == "skip_first: the graph's first 1x1 conv stays dense"
    assert "kernel 3×3, stride [2, 2]" in reasons["conv:stem"]
    assert "kernel 3×3, groups 24 (depthwise)" in reasons["conv:dw"]
    assert "stride [2, 2]" in reasons["conv:down"] and "kernel" not in reasons["conv:down"]
    stats = _compile(target=0.5, skip_first=False, skip_last=True).plan.passes["conv_sparsity"]["stats"]
    assert stats["rewritten"] == 2
    assert {r["site"]: r["reason"] for r in stats["refused"]}["conv:head"] == (
        "skip_last: the graph's last 1x1 conv stays dense")


def test_overrides_name_conv_sites_by_module_path():
    config = {"passes": ["conv_profile", {"conv_sparsity": {"target": 0.5, "skip_first": False}}],
              "overrides": {"head": {"conv_sparsity": {"target": 0.0}}}}
    cm = sg.compile(_tiny(), config, example_inputs=(X,), calibration=CALIBRATION, quiet=True)
    stats = cm.plan.passes["conv_sparsity"]["stats"]
    assert stats["rewritten"] == 2 and "conv_sparsity" not in cm.plan.sites.get("conv:head", {})
    assert any(r["site"] == "conv:head" and "keeps every weight" in r["reason"] for r in stats["refused"])


def test_structure_conv_norm_and_clamp_become_one_op():
    cm = _compile(target=0.5, skip_first=False)
    gm = cm.graph_module
    ops = [n for n in gm.graph.nodes if n.target is OP.overload]
    assert [meta.get(n).site for n in ops] == ["conv:expand", "conv:project", "conv:head"]
    assert all(meta.get(n).role == "conv.1x1" for n in ops)
    assert [n.args[-2:] for n in ops] == [(0.0, 6.0), (None, None), (0.0, None)]  # ReLU6, none, ReLU
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.aten.batch_norm.default) == 2  # stem's and the depthwise's remain
    assert targets.count(torch.ops.aten.conv2d.default) == 3  # stem, depthwise, the strided 1x1
    weight, bias, values, _, indptr = ops[0].args[1:6]
    assert ir.shape(weight) == (24, 8, 1, 1) and ir.shape(bias) == (24,) and ir.shape(indptr) == (25,)
    assert ir.shape(values)[0] == round(0.5 * 24 * 8)  # the layer keeps half its weights (group: layer)


@pytest.mark.parametrize("options", [{}, {"fuse": False}, {"score": "magnitude", "compensate": False},
                                     {"block": 4, "group": "output"}, {"block": 2, "target": 0.7}])
def test_numeric_equals_the_dense_model_with_the_same_weights_pruned(options):
    model = _tiny()
    cm = _compile(model, skip_first=False, **options)
    assert cm.plan.passes["conv_sparsity"]["stats"]["rewritten"] == 3
    expected = _pruned_by_hand(model, cm.plan)(X)
    torch.testing.assert_close(cm(X), expected, **TOL)
    with sg.codegen.use_backend("reference"):
        torch.testing.assert_close(cm(X), expected, **TOL)


@pytest.mark.parametrize("fuse", [True, False])
def test_recover_distils_each_1x1_conv_at_the_output_its_op_gives(fuse):
    """recover's layer-wise term compares like with like: a fused op's output with the dense graph's after
    the norm (and clamp), an unfused one's with the dense conv's."""
    from sparsegraph.context import Batch
    from sparsegraph.recover import _fused_convs, _run, _targets

    model = _tiny()
    cm = _compile(model, target=0.5, fuse=fuse)
    batch = Batch.of(CALIBRATION[0])
    ((_, dense),) = _targets(model, [batch], cm.example, _fused_convs(cm.plan))
    _, ours = _run(cm.graph_module, batch, taps=True)
    assert set(ours) == set(dense) == {"conv:expand", "conv:project", "conv:head"}
    pruned = _pruned_by_hand(model, cm.plan)
    with torch.no_grad():  # conv:project is the first rewritten site (skip_first): both graphs feed it y
        x = F.relu6(model.bn0(model.stem(batch.args[0])))
        y = F.relu6(model.bn2(model.dw(F.relu6(model.bn1(model.expand(x))))))
        want = [model.project(y), pruned.project(y)]
    if fuse:
        want = [model.bn3(w) for w in want]
    torch.testing.assert_close(dense["conv:project"], want[0], rtol=0, atol=0)
    torch.testing.assert_close(ours["conv:project"], want[1], **TOL)
    run = sg.recover(cm, CALIBRATION, steps=10, lr=1e-3, layers=1.0).plan.passes["recover"]["summary"]
    assert run["runs"][0]["loss_after"] < run["runs"][0]["loss_before"]


def test_target_zero_refuses_every_site_and_gives_the_dense_result_exactly():
    model = _tiny()
    cm = _compile(model, target=0.0, skip_first=False)
    stats = cm.plan.passes["conv_sparsity"]["stats"]
    assert stats["rewritten"] == 0
    assert sum("keeps every weight" in r["reason"] for r in stats["refused"]) == 3
    assert torch.equal(cm(X), model(X))


def test_the_kept_mask_follows_target_block_and_group():
    cm = _compile(target=0.75, block=4, group="output", skip_first=False)
    for site, channels, outputs in (("conv:expand", 8, 24), ("conv:head", 13, 40)):
        d = cm.plan.sites[site]["conv_sparsity"]["decision"]
        kept = _from_hex(d["kept"], channels)
        assert kept.shape == (outputs // 4, channels)
        assert (kept.sum(1) == round(0.25 * channels)).all()  # the same share in every block row
    evidence = cm.plan.sites["conv:head"]["conv_sparsity"]["evidence"]
    assert evidence["score"] == "activation" and 0 < evidence["kept_score_share"] < 1
    masks = {score: _compile(target=0.5, score=score).plan.sites["conv:head"]["conv_sparsity"]["decision"]
             ["kept"] for score in ("activation", "magnitude")}
    assert masks["activation"] != masks["magnitude"]  # the channel rms reorders the weights


def test_compensation_moves_the_bias_by_the_pruned_weights_mean_contribution():
    model = _tiny()
    cm = _compile(model, target=0.5)
    d = cm.plan.sites["conv:head"]["conv_sparsity"]["decision"]
    mean = torch.tensor(cm.plan.sites["conv:head"]["conv_profile"]["evidence"]["mean"], dtype=torch.float64)
    kept = _from_hex(d["kept"], 13)
    weight = model.head.weight[:, :, 0, 0].double()
    torch.testing.assert_close(torch.tensor(d["bias_shift"], dtype=torch.float64), (weight * ~kept) @ mean)
    assert _compile(model, target=0.5, compensate=False).plan.sites["conv:head"]["conv_sparsity"][
        "decision"]["bias_shift"] == []


def test_conv_profile_records_each_input_channel_s_mean_and_rms():
    model = _tiny()
    cm = _compile(model, target=0.5)
    inputs = []
    hook = model.head.register_forward_hook(lambda m, i, o: inputs.append(i[0]))
    with torch.no_grad():
        for (batch,) in CALIBRATION:
            model(batch)
    hook.remove()
    x = torch.cat(inputs).double()
    evidence = cm.plan.sites["conv:head"]["conv_profile"]["evidence"]
    assert evidence["pixels"] == x.shape[0] * x.shape[2] * x.shape[3]
    torch.testing.assert_close(torch.tensor(evidence["mean"], dtype=torch.float64), x.mean((0, 2, 3)))
    rms = x.square().mean((0, 2, 3)).sqrt()
    torch.testing.assert_close(torch.tensor(evidence["rms"], dtype=torch.float64), rms)


def test_a_saved_plan_replays_without_calibration_to_the_same_bits(tmp_path):
    model = _tiny()
    cm = _compile(model, target=0.6, skip_first=False)
    cm.plan.save(tmp_path / "plan.json")
    replayed = sg.compile(model, plan=tmp_path / "plan.json", example_inputs=(X,), quiet=True)
    assert replayed.plan.sites == cm.plan.sites
    assert torch.equal(replayed(X), cm(X))


def test_a_saved_model_loads_without_the_original_and_speed_check_times_the_op(tmp_path):
    cm = _compile(target=0.5, skip_first=False)
    cm.save(tmp_path / "model")
    assert torch.equal(sg.load(tmp_path / "model")(X), cm(X))
    config = {"passes": ["conv_profile", {"conv_sparsity": {"target": 0.5}}, "speed_check"]}
    timed = sg.compile(_tiny(), config, example_inputs=(X,), calibration=CALIBRATION, quiet=True)
    assert timed.plan.passes["speed_check"]["stats"]["matched"] == 2  # project and head, against conv2d


def test_the_user_s_model_is_left_alone():
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _compile(model, target=0.9, skip_first=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.head.bias is not None and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["kept"].pop(), r"has 9 items, 10 expected \(one per block of output channels"),
    (lambda d: d["kept"].__setitem__(0, "zz00"), r"\['kept'\]\[0\]: is not a string of hex digits"),
    (lambda d: d["kept"].__setitem__(0, "ff"), r"\[0\]: has 2 hex digits; 13 input channels take 4"),
    (lambda d: d["kept"].__setitem__(0, "00e0"), r"keeps an input channel ≥ 13, past the conv's inputs"),
    (lambda d: d.__setitem__("block", 3), r"\['block'\]: is not one of the block sizes the kernels take"),
    (lambda d: d["bias_shift"].pop(), r"has 39 values for 40 output channels"),
    (lambda d: d.pop("fuse"), r"misses key 'fuse'"),
])
def test_a_tampered_decision_is_refused_naming_the_key(edit, message, tmp_path):
    model = _tiny()
    cm = _compile(model, target=0.5, block=4)
    plan = json.loads(json.dumps(cm.plan.to_json()))
    edit(plan["sites"]["conv:head"]["conv_sparsity"]["decision"])
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(PlanEntryError, match=message):
        sg.compile(model, plan=tmp_path / "plan.json", example_inputs=(X,), quiet=True)


def test_a_decision_for_a_conv_that_is_no_site_is_refused(tmp_path):
    model = _tiny()
    plan = json.loads(json.dumps(_compile(model, target=0.5).plan.to_json()))
    plan["sites"]["conv:down"] = plan["sites"].pop("conv:head")
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(PlanEntryError, match="'conv:down', which is not a 1x1 conv site of this graph"):
        sg.compile(model, plan=tmp_path / "plan.json", example_inputs=(X,), quiet=True)


def test_conv_profile_is_required_and_its_facts_checked(tmp_path):
    with pytest.raises(sg.ConfigError, match="requires 'conv_profile' earlier"):
        sg.compile(_tiny(), {"passes": ["conv_sparsity"]}, example_inputs=(X,), quiet=True)
    model = _tiny()
    plan = json.loads(json.dumps(_compile(model, target=0.5).plan.to_json()))
    plan["sites"]["conv:head"]["conv_profile"]["evidence"]["rms"].pop()
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(PlanEntryError, match=r"\['rms'\]: has 12 items, 13 expected"):
        sg.compile(model, plan=tmp_path / "plan.json", example_inputs=(X,), quiet=True)


def test_milder_levels_lower_the_target():
    gm = sg.trace(_tiny(), (X,))
    site = ir.conv_sites(gm)[1]
    opts = ConvSparsity(target=0.8, block=2)
    assert [(m.target, m.block) for m in opts.milder(site, opts, None)] == [(0.6, 2), (0.4, 2), (0.2, 2)]


def test_the_budget_backs_off_to_meet_a_fidelity_floor():
    model = _tiny()
    calibration = [(_images(4, s),) for s in range(1, 9)]
    config = {"passes": ["conv_profile", {"conv_sparsity": {"target": 0.9, "skip_first": False}}],
              "fidelity": {"metric": "cosine", "min": 0.9999, "holdout": 0.25}}  # 90% everywhere: 0.9991
    cm = sg.compile(model, config,
                    example_inputs=(X,), calibration=calibration, quiet=True)
    held_out = torch.cat([b for (b,) in calibration[-2:]])
    assert cosine(cm(held_out), model(held_out)) >= 0.9999
    counters = cm.plan.passes["budget"]["stats"]["counters"]
    assert counters.get("lower", 0) + counters.get("revert", 0) > 0


def test_onnx_export_of_the_rewritten_model_matches(tmp_path):
    cm = _compile(target=0.5, skip_first=False)
    path = cm.export_onnx(tmp_path / "tiny.onnx")  # checked against PyTorch by the export itself
    assert path.exists()


def test_mobilenet_v2_at_small_resolution():
    """torchvision's MobileNetV2 (random init): 34 pointwise convs (33 rewritten: the first is kept), the
    rewritten graph equal to the hand-pruned dense model."""
    model, _ = models.resolve("torchvision:mobilenet_v2")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    cm = _compile(model, example=(x,), calibration=[(x,)], target=0.8)
    stats = cm.plan.passes["conv_sparsity"]["stats"]
    assert stats["rewritten"] == 33 and stats["matched"] == 52
    torch.testing.assert_close(cm(x), _pruned_by_hand(model, cm.plan)(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.ci
def test_efficientnet_lite0_real_weights_rewrite_replay_and_export(tmp_path):
    """The pretrained EfficientNet-Lite0: 31 of its 32 pointwise convs at 50% (skip_first), equal to the
    hand-pruned model, replayed from the saved plan to the same bits, exported to ONNX (checked there)."""
    from sparsegraph.data.sample_images import crops

    model, example = models.load("efficientnet_lite0")
    cm = _compile(model, example=example, calibration=[(crops(8, seed=1),)], target=0.5)
    stats = cm.plan.passes["conv_sparsity"]["stats"]
    assert stats["matched"] == 49 and stats["rewritten"] == 31
    x = crops(4, seed=2)
    with torch.no_grad():
        expected = _pruned_by_hand(model, cm.plan)(x)
        torch.testing.assert_close(cm(x), expected, rtol=1e-4, atol=1e-4)
        cm.plan.save(tmp_path / "plan.json")
        replayed = sg.compile(model, plan=tmp_path / "plan.json", example_inputs=example, quiet=True)
        assert torch.equal(replayed(x), cm(x))
    cm.export_onnx(tmp_path / "efficientnet.onnx")
