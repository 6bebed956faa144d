"""packed_shift_labels: the next-token shift of a padding-free batch stays inside each sequence."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import entropy_kernels as ek
from entropy_kernels import reference


@given(
    lengths=st.lists(st.integers(0, 6), min_size=1, max_size=6),
    padding=st.integers(0, 3),
    leading=st.sampled_from([(), (1,), (2,)]),
    ignore_index=st.sampled_from([-100, -1, 0]),
    dtype=st.sampled_from([torch.int64, torch.int32]),
    cu_dtype=st.sampled_from([torch.int64, torch.int32]),
)
def test_matches_per_sequence_shift(lengths, padding, leading, ignore_index, dtype, cu_dtype):
    total = sum(lengths) + padding
    input_ids = torch.randint(1, 1000, (*leading, total), dtype=dtype)
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=cu_dtype)
    labels = ek.packed_shift_labels(input_ids, cu_seqlens, ignore_index=ignore_index)
    assert labels.dtype == input_ids.dtype and labels.shape == input_ids.shape
    want = reference.packed_shift_labels(input_ids, cu_seqlens, ignore_index=ignore_index)
    assert torch.equal(labels, want)


def test_last_token_of_a_sequence_never_predicts_the_next_sequence():
    # Two sequences [10, 11, 12] and [20, 21]: a plain roll would label 12 -> 20.
    input_ids = torch.tensor([[10, 11, 12, 20, 21]])
    labels = ek.packed_shift_labels(input_ids, torch.tensor([0, 3, 5]))
    assert labels.tolist() == [[11, 12, -100, 21, -100]]
    rolled = torch.roll(input_ids, -1, dims=-1)
    assert rolled[0, 2] == 20  # the cross-boundary label this helper avoids


def test_labels_feed_the_scoring():
    input_ids = torch.tensor([3, 1, 4, 1, 5, 9])
    cu_seqlens = torch.tensor([0, 2, 6])
    labels = ek.packed_shift_labels(input_ids, cu_seqlens)
    logits = torch.randn(6, 10)
    logp, _ = ek.logprobs_and_entropy(logits, labels, backend="torch")
    assert logp[1] == 0 and logp[5] == 0 and bool((logp[[0, 2, 3, 4]] < 0).all())


@pytest.mark.parametrize(
    "cu_seqlens, match",
    [
        (torch.tensor([1, 3]), "start at 0"),
        (torch.tensor([0, 4, 3]), "never decrease"),
        (torch.tensor([0, 7]), "at most"),
        (torch.tensor([[0, 3]]), "1-D"),
        (torch.tensor([0.0, 3.0]), "integer"),
        ([0, 3], "1-D"),
    ],
)
def test_bad_cu_seqlens(cu_seqlens, match):
    with pytest.raises(ValueError, match="cu_seqlens") as error:
        ek.packed_shift_labels(torch.arange(5), cu_seqlens)
    assert match in str(error.value)


def test_bad_input_ids():
    with pytest.raises(ValueError, match="input_ids"):
        ek.packed_shift_labels(torch.zeros(4), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="input_ids"):
        ek.packed_shift_labels(torch.tensor(3), torch.tensor([0, 1]))
