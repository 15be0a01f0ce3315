"""aqua_alloc.hf.attention: the once-per-process warning about cuDNN attention, and the switch."""

import warnings

import pytest
import torch

from aqua_alloc.hf import attention


@pytest.fixture
def cudnn_flag():
    """Restore the process-wide cuDNN attention switch and the warned-once flag."""
    was_on = torch.backends.cuda.cudnn_sdp_enabled()
    attention._warned.clear()
    yield
    torch.backends.cuda.enable_cudnn_sdp(was_on)
    attention._warned.clear()


def test_warns_once_for_cuda_with_cudnn_attention_on(cudnn_flag):
    torch.backends.cuda.enable_cudnn_sdp(True)
    with pytest.warns(RuntimeWarning, match="enable_cudnn_sdp\\(False\\)"):
        assert attention.warn_if_cudnn_attention(torch.device("cuda", 0)) is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise here
        assert attention.warn_if_cudnn_attention(torch.device("cuda", 0)) is False


@pytest.mark.parametrize("device", [None, torch.device("cpu")])
def test_no_warning_off_cuda(cudnn_flag, device):
    torch.backends.cuda.enable_cudnn_sdp(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert attention.warn_if_cudnn_attention(device) is False
    assert not attention._warned.is_set()


def test_switch_turns_cudnn_attention_off_and_says_if_it_was_on(cudnn_flag):
    torch.backends.cuda.enable_cudnn_sdp(True)
    assert attention.use_decode_friendly_attention() is True
    assert torch.backends.cuda.cudnn_sdp_enabled() is False
    assert attention.use_decode_friendly_attention() is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert attention.warn_if_cudnn_attention(torch.device("cuda", 0)) is False
