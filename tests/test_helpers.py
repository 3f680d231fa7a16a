"""The shared assertions catch what they are for (a check that cannot fail is a defect)."""

import pytest

from tests.helpers import assert_bfloat16_close, assert_float32_close


def test_float32_rounding_passes_and_a_real_difference_fails():
    losses = [1.0986123, 1.0412345, 0.9876543]
    rounded = [x * (1 + 1.8e-7 / x) for x in losses]  # CI's failing step differed by 1.8e-7
    assert_float32_close(rounded, losses)
    with pytest.raises(AssertionError):
        assert_float32_close([x * (1 + 1e-4) for x in losses], losses)  # a wrong step
    with pytest.raises(AssertionError):
        assert_float32_close(losses[:2], losses)  # a missing step


def test_bfloat16_rounding_passes_and_a_real_difference_fails():
    losses = [1.0986123, 1.0412345, 0.9876543]
    assert_bfloat16_close([x * (1 + 2**-8) for x in losses], losses)  # one bf16 step
    with pytest.raises(AssertionError):
        assert_bfloat16_close([x * 1.03 for x in losses], losses)  # 3%: a wrong step
    with pytest.raises(AssertionError):
        assert_float32_close([x * (1 + 2**-8) for x in losses], losses)  # float32 is stricter
