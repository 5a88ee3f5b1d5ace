"""The capture engine (quant_core.calib.capture): statistics recorded by forward hooks over several runs and
accumulated into one file equal those of all rows at once; whole runs go to the held-out part; the memory plan;
every refusal is one line and leaves the file as it was."""
import json
import os

import pytest
import torch

import quant_core
from quant_core.calib import load_calibration
from quant_core.calib.capture import GIB, linear_widths, new_session, plan_capture, save_capture
from quant_core.calib.file import CalibrationFile
from quant_core.calib.stats import SAMPLE_ROWS, StatsAccumulator


class Net(torch.nn.Module):
    def __init__(self, k=24, hidden=40):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.up = torch.nn.Linear(k, hidden)
        self.down = torch.nn.Linear(hidden, k)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def batches(seed, n=3, k=24):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 16, k, generator=g) * torch.linspace(0.2, 3, k) + 0.5 for _ in range(n)]


def capture_run(session, net, run_id, data):
    session.start(run_id)
    with session.hooks(net):
        for x in data:
            session.note_call(torch.tensor([0.5]))
            net(x)
    return session.take(run_id)


def reference(net, runs):
    """Statistics over all rows of `runs` at once, per layer."""
    accs = {name: StatsAccumulator(m.in_features) for name, m in net.named_modules() if isinstance(m, torch.nn.Linear)}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=name: accs[n].add(inp[0]))
             for name, m in net.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for data in runs:
            for x in data:
                net(x)
    for h in hooks:
        h.remove()
    return {n: a.result() for n, a in accs.items()}


def test_runs_accumulated_into_one_file_equal_all_rows_at_once(tmp_path):
    net = Net()
    session = new_session("Net", "test", linear_widths(net), budget_gb=1)
    path = str(tmp_path / "cap.safetensors")
    data = [batches(s) for s in range(3)]
    for i, d in enumerate(data):
        summary = save_capture(path, capture_run(session, net, i, d), heldout_every=0)
    assert (summary.runs, summary.heldout_runs, summary.full) == (3, 0, 2)
    got, want = load_calibration(path), reference(net, data)
    for layer in want:
        assert got[layer].n_tokens == want[layer].n_tokens == 3 * 3 * 32
        for field in ("absmax", "mean_sq", "mean", "hessian"):
            torch.testing.assert_close(getattr(got[layer], field), getattr(want[layer], field), rtol=1e-5, atol=1e-6)
        assert not got[layer].has_heldout
    info = CalibrationFile(path).capture_info()
    assert info["runs"] == 3 and info["calls"] == 9 and info["sigmas"]["min"] == 0.5


def test_every_nth_run_is_held_out_whole(tmp_path):
    net = Net()
    session = new_session("Net", "test", linear_widths(net), budget_gb=1)
    path = str(tmp_path / "cap.safetensors")
    data = [batches(s) for s in range(4)]
    roles = [save_capture(path, capture_run(session, net, i, d), heldout_every=2).role for i, d in enumerate(data)]
    assert roles == ["fit", "held-out", "fit", "held-out"]
    got = load_calibration(path)
    fit, held = reference(net, data[0::2]), reference(net, data[1::2])
    for layer in fit:
        torch.testing.assert_close(got[layer].hessian, fit[layer].hessian, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[layer].heldout_hessian, held[layer].hessian, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[layer].heldout_mean_sq, held[layer].mean_sq, rtol=1e-5, atol=1e-6)
        assert got[layer].heldout_n_tokens == held[layer].n_tokens and got[layer].n_tokens == fit[layer].n_tokens


def test_budget_gives_full_hessians_to_the_narrowest_layers_and_diagonals_to_the_rest(tmp_path):
    widths = {"wide": 4096, "narrow": 64, "mid": 1024}
    diag = sum(StatsAccumulator.nbytes(k, False, sample_rows=SAMPLE_ROWS) for k in widths.values())
    plan = plan_capture(widths, diag + 4 * 64 * 64 + 4 * 1024 * 1024)
    assert plan.full == {"narrow", "mid"} and "1 diagonal only" in plan.describe()
    with pytest.raises(quant_core.QuantError, match="cannot hold even the diagonal"):
        plan_capture(widths, diag - 1)
    net = Net()
    diag = sum(StatsAccumulator.nbytes(k, False, sample_rows=SAMPLE_ROWS) for k in linear_widths(net).values())
    session = new_session("Net", "test", linear_widths(net), budget_gb=(diag + 4 * 24 * 24) / GIB)
    path = str(tmp_path / "cap.safetensors")
    save_capture(path, capture_run(session, net, 0, batches(0)))
    reader = CalibrationFile(path)
    assert "hessian" in reader.layers["up"] and "hessian" not in reader.layers["down"]
    assert reader.capture_info()["layers"]["diagonal_only"] == ["down"]


def test_hessian_from_strided_rows_estimates_the_same_second_moment():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8192, 16, generator=g) @ torch.randn(16, 16, generator=g)
    full, sub = StatsAccumulator(16, buffered=False), StatsAccumulator(16, buffered=False, max_gram_tokens=1024)
    full.add(x)
    sub.add(x)
    a, b = full.result(), sub.result()
    assert sub.n_gram == 1024 and b.n_tokens == 8192
    torch.testing.assert_close(a.mean_sq, b.mean_sq)
    assert float((a.hessian - b.hessian).norm() / a.hessian.norm()) < 0.1


def test_refusals_are_one_line_and_leave_the_file_as_it_was(tmp_path):
    net = Net()
    session = new_session("Net", "test", linear_widths(net), budget_gb=1)
    path = str(tmp_path / "cap.safetensors")
    with pytest.raises(quant_core.QuantError, match="saw no tokens"):
        save_capture(path, session.take(0))
    assert not os.path.exists(path)
    save_capture(path, capture_run(session, net, 0, batches(0)))
    before = open(path, "rb").read()
    with pytest.raises(quant_core.QuantError, match="exists: choose mode accumulate"):
        save_capture(path, capture_run(session, net, 1, batches(1)), mode="new file")
    other = Net(k=32)
    other_session = new_session("Other", "test", linear_widths(other), budget_gb=1)
    with pytest.raises(quant_core.QuantError, match="another model.*another input width.*up"):
        save_capture(path, capture_run(other_session, other, 0, batches(0, k=32)))
    run = capture_run(session, net, 2, batches(2))

    class Interrupted(Exception):
        pass

    def interrupted(layer):  # ComfyUI's Cancel raises in the middle of the write
        raise Interrupted(layer)
    run.stats = interrupted
    with pytest.raises(Interrupted):
        save_capture(path, run)
    assert open(path, "rb").read() == before
    assert [p for p in os.listdir(tmp_path) if p != "cap.safetensors"] == []


def test_interrupted_run_does_not_leak_into_the_next(tmp_path):
    net = Net()
    session = new_session("Net", "test", linear_widths(net), budget_gb=1)
    session.start("interrupted")
    with session.hooks(net):
        net(batches(9)[0])
        session.note_call()
    run = capture_run(session, net, "next", batches(0))  # a new run id: the stale statistics are dropped
    path = str(tmp_path / "cap.safetensors")
    save_capture(path, run)
    assert load_calibration(path)["up"].n_tokens == 3 * 32


def test_hooks_do_not_change_outputs_and_are_removed():
    net = Net()
    x = batches(3)[0]
    before = net(x)
    session = new_session("Net", "test", linear_widths(net), budget_gb=1)
    session.start(0)
    with session.hooks(net) as n:
        assert n == 2
        during = net(x)
    assert torch.equal(before, during)
    assert not net.up._forward_hooks and not net.down._forward_hooks


def test_captured_file_is_taken_by_the_converter_under_the_checkpoint_prefix(tmp_path, make_file):
    net = Net()
    session = new_session("Net", "test", linear_widths(net), budget_gb=1)
    cap = str(tmp_path / "cap.safetensors")
    for i in range(3):
        save_capture(cap, capture_run(session, net, i, batches(i)), heldout_every=2)
    src = make_file({f"model.diffusion_model.{n}.weight": m.weight.detach().clone() for n, m in
                     (("up", net.up), ("down", net.down))})
    result = quant_core.quantize(src, str(tmp_path / "q.safetensors"), method="gptq", calibration_data=cap,
                                 format="int8")
    assert all("calibration file" in s.calibration for s in result.report.layers)
    meta = json.loads(CalibrationFile(cap).metadata["capture"])
    assert (meta["runs"], meta["heldout_runs"]) == (2, 1)


def test_layers_fed_one_vector_per_sample_give_their_hessian_budget_to_others(tmp_path):
    """Modulation layers see one row per sample: a Hessian of rank ≤ calls. Their share goes to layers not yet run."""
    class Modulated(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mod = torch.nn.Linear(24, 24)  # per-sample vector
            self.up = torch.nn.Linear(24, 40)
            self.down = torch.nn.Linear(40, 24)

        def forward(self, x):
            return self.down(torch.relu(self.up(x * self.mod(x.mean(dim=1)).unsqueeze(1))))
    net = Modulated()
    widths = linear_widths(net)
    diag = sum(StatsAccumulator.nbytes(k, False, sample_rows=SAMPLE_ROWS) for k in widths.values())
    session = new_session("Mod", "test", widths, budget_gb=(diag + 2 * 4 * 24 * 24) / GIB)
    assert session.plan.full == {"mod", "up"}  # the planner cannot know yet: narrowest first
    session.start(0)
    session.allocate("cpu")
    with session.hooks(net):
        for x in batches(0):
            session.note_call()
            net(x)
    assert session.plan.full == {"up"} and session.plan.few_rows == {"mod"}
    assert "one vector per sample" in session.plan.describe()
    path = str(tmp_path / "cap.safetensors")
    save_capture(path, session.take(0))
    reader = CalibrationFile(path)
    assert "hessian" not in reader.layers["mod"] and "hessian" in reader.layers["up"]
    budget = (diag + 4 * 24 * 24 + 4 * 40 * 40) / GIB  # after demoting mod, down (run later) fits
    session = new_session("Mod", "test", widths, budget_gb=budget)
    session.start(0)
    with session.hooks(net):
        net(batches(0)[0])
        session.note_call()
    assert session.plan.full == {"up", "down"}
    assert session.take(0).accumulators["down"].gram is not None
