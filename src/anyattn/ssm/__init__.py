"""State-space and long-convolution mixers: Mamba's selective scan, Mamba-2's SSD, S4D and FFT long
convolutions, each with a parallel (training) form, a step-by-step oracle and one-token decoding steps.
See docs/ssm.md."""
from .long_conv import fft_conv, long_conv, smooth_kernel, squash_kernel
from .recurrent import long_conv_ref, s4d_ref, ssd_ref
from .s4d import s4d, s4d_inv_init, s4d_kernel, s4d_lin_init
from .selective_scan import selective_scan, selective_scan_fn, selective_scan_ref
from .ssd import ssd
from .steps import LongConvState, long_conv_step, s4d_step, selective_scan_step, ssd_step

__all__ = [
    "selective_scan", "selective_scan_fn", "selective_scan_step", "selective_scan_ref",
    "ssd", "ssd_step", "ssd_ref",
    "s4d", "s4d_kernel", "s4d_step", "s4d_ref", "s4d_lin_init", "s4d_inv_init",
    "long_conv", "long_conv_step", "long_conv_ref", "LongConvState", "fft_conv", "squash_kernel", "smooth_kernel",
]
