"""The transformers range: what is verified on which release, and the run-time check on the others."""

from __future__ import annotations

import warnings

import pytest
import torch

import moe_balance as mb
from moe_balance.patching import interception, versions
from moe_balance.testing import tiny_model


@pytest.mark.compat
def test_verified_list_of_the_installed_release_is_current():
    release = versions.installed_series()
    if release not in versions.TESTED:
        pytest.skip(f"transformers {release} is not a tested release {versions.TESTED}")
    assert list(versions.VERIFIED[release]) == versions.verifiable_here(), (
        "regenerate this release's line of moe_balance/patching/versions.py VERIFIED with "
        "`python -m moe_balance.patching.versions`")


def test_series_parsing():
    assert versions.series("5.25.0") == "5.25" and versions.series("4.57.6") == "4.57"
    assert versions.series("5.26.0.dev0") == "5.26" and versions.series("6.0.0rc1") == "6.0"


def _ids(seed=0):
    return torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(seed))


def _as_unverified(monkeypatch):
    monkeypatch.setattr(versions, "VERIFIED", {})


@pytest.mark.compat
@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_unverified_release_is_checked_on_the_first_forward_and_kept(model_type, monkeypatch):
    """A release nobody verified: patch() warns, the first forward compares stock and patched routing at a zero
    bias (same RNG), the patch stays and the model computes exactly what it did unpatched."""
    _as_unverified(monkeypatch)
    model = tiny_model(model_type)
    model.train()
    reference = model(input_ids=_ids(), labels=_ids()).loss
    with pytest.warns(UserWarning, match="not verified on transformers"):
        mb.patch(model)
    state = mb.patching.patch_state_of(model)
    assert state.parity_pending == {s.layer for s in state.sites}
    assert torch.equal(model(input_ids=_ids(), labels=_ids()).loss, reference)
    assert state.parity_pending == set() and state.parity_failures == []
    assert mb.patching.patch_state_of(model) is state
    mb.unpatch(model)


def test_unverified_router_that_routes_otherwise_is_refused(monkeypatch):
    """The interception misreading a router (as a changed release could make it): refused on the first forward,
    the model unpatched, the message naming the model type, the release and the routers."""
    _as_unverified(monkeypatch)
    real_topk = interception.SelectionInterceptor._topk

    def reversed_topk(self, func, args, kwargs):  # picks the k worst experts: what a misread selection would do
        out = real_topk(self, func, args, kwargs)
        x = args[0]
        if x.shape[-1] != self.num_experts:
            return out
        idx = torch.topk(-x.detach(), self.top_k, dim=-1).indices
        return torch.return_types.topk((x.gather(-1, idx), idx))
    monkeypatch.setattr(interception.SelectionInterceptor, "_topk", reversed_topk)
    model = tiny_model("mixtral")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mb.patch(model)
    with pytest.raises(mb.UnverifiedRouterError, match=r"'mixtral' is not verified on transformers .*layers"):
        model(input_ids=_ids())
    assert mb.patching.patch_state_of(model) is None


def test_verified_release_runs_no_check(monkeypatch):
    monkeypatch.setattr(versions, "VERIFIED", {versions.installed_series(): ("mixtral",)})
    model = tiny_model("mixtral")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mb.patch(model)
    assert mb.patching.patch_state_of(model).parity_pending == set()
    mb.unpatch(model)


def test_registered_custom_router_is_not_checked(monkeypatch):
    """A user's own router (not a transformers architecture) has nothing to be verified against."""
    _as_unverified(monkeypatch)

    class TinyRouter(torch.nn.Linear):
        def forward(self, x):
            logits = super().forward(x)
            return logits, *torch.topk(logits.softmax(-1), 2)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.router = TinyRouter(8, 4)

        def forward(self, x):
            return self.router(x)
    mb.register_router(TinyRouter, "generic", num_experts="out_features", top_k=lambda m: 2)
    net = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mb.patch(net, fold_share=0)
    assert mb.patching.patch_state_of(net).parity_pending == set()
    mb.unpatch(net)


@pytest.mark.compat
@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "gpt_oss", "deepseek_v3"])
def test_one_training_step_moves_the_balance_and_unpatch_restores(model_type):
    """What a user tries first on any release: patch, one optimizer step moves the routing (the bias, or with the
    online fold the router weights), unpatch gives the original classes and native buffers back."""
    model = tiny_model(model_type)
    model.train()
    classes = {n: type(m) for n, m in model.named_modules()}
    natives = {n: b.clone() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}
    bal = mb.patch(model, bias_update="sign", bias_update_rate=1e-2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: only the balancer changes anything
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(input_ids=_ids(), labels=_ids()).loss.backward()
    optimizer.step()
    bal.step()
    moved_bias = bal.bias_LE.abs().max() > 0
    moved_weights = any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert moved_bias or moved_weights
    if natives:  # the native buffer carries the trained bias while patched
        assert any(not torch.equal(b, natives[n]) for n, b in model.named_buffers() if n in natives)
    mb.unpatch(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert all(torch.equal(b, natives[n]) for n, b in model.named_buffers() if n in natives)


def test_hf_extra_has_no_upper_bound_on_transformers():
    """`pip install moe-balance[hf]` must never downgrade a user's transformers: the oldest verified release
    is the floor, and there is no ceiling (newer releases meet the run-time check)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    from .conftest import ROOT
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (requirement,) = [r for r in extras["hf"] if r.startswith("transformers")]
    assert "<" not in requirement and requirement == f"transformers>={min(versions.TESTED, key=versions_key)}"


def versions_key(release: str) -> tuple[int, ...]:
    return tuple(int(part) for part in release.split("."))
