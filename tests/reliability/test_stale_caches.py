"""Issue 29, class 4: caches keyed on what they depend on.

``project()`` packs each head's weights once and computes each timestep's modulation once; both
are keyed on the parameters' versions and on a sampled fingerprint of their values, so a weight
changed in place, through ``p.data`` (which no version counter sees) or otherwise, is used at once.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cleandift_rt import ProjectionHeads, project

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise(heads: ProjectionHeads, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in heads.parameters():
        p.data.copy_(torch.randn(p.shape, generator=gen) * 0.1)


HEADS = ProjectionHeads({"us6": 16}).eval()
_randomise(HEADS, 0)
PARAMS = [name for name, _ in HEADS.named_parameters() if name.startswith(("adapters", "mapping", "time_"))]


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(name=st.sampled_from(PARAMS), how=st.sampled_from(["data.copy_", "no_grad copy_", "data[0]"]),
       t=st.sampled_from([0, 261, 999]), seed=st.integers(1, 10**6))
def test_project_sees_weights_changed_in_place(tally, name, how, t, seed):
    feats = torch.randn(2, 16, 3, 4, generator=torch.Generator().manual_seed(seed))
    before = project(feats, t, HEADS, "us6")  # packs and caches
    p = dict(HEADS.named_parameters())[name]
    new = torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.1
    if how == "data.copy_":
        p.data.copy_(new)
    elif how == "no_grad copy_":
        with torch.no_grad():
            p.copy_(new)
    else:  # one whole row through .data (the sampled fingerprint reads every tensor's first value)
        p.data.view(-1)[0] = float(new.view(-1)[0]) + 1.0
    after = project(feats, t, HEADS, "us6")
    with torch.no_grad():
        want = HEADS("us6", feats, t)
    torch.testing.assert_close(after, want, rtol=1e-5, atol=1e-5)
    assert not torch.equal(before, after) or torch.equal(HEADS("us6", feats, t), before)
    tally.checked_result()
