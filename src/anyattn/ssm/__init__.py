"""State-space and long-convolution mixers: Mamba's selective scan, Mamba-2's SSD, S4D and FFT long
convolutions, each with a parallel (training) form, a step-by-step oracle and one-token decoding steps.
See docs/ssm.md."""
from .chimera import chimera, chimera_step
from .cross_scan import cross_merge_2d, cross_scan_2d
from .frequency_filter import frequency_filter
from .long_conv import fft_conv, long_conv, smooth_kernel, squash_kernel
from .recurrent import long_conv_ref, s4d_ref, ssd_ref
from .s4d import s4d, s4d_inv_init, s4d_kernel, s4d_lin_init
from .selective_scan import backend_choice, selective_scan, selective_scan_fn, selective_scan_ref
from .ssd import ssd
from .steps import LongConvState, long_conv_step, s4d_step, selective_scan_step, ssd_step

__all__ = [
    "selective_scan", "selective_scan_fn", "backend_choice", "selective_scan_step", "selective_scan_ref",
    "ssd", "ssd_step", "ssd_ref",
    "s4d", "s4d_kernel", "s4d_step", "s4d_ref", "s4d_lin_init", "s4d_inv_init",
    "long_conv", "long_conv_step", "long_conv_ref", "LongConvState", "fft_conv", "squash_kernel", "smooth_kernel",
    "chimera", "chimera_step", "cross_scan_2d", "cross_merge_2d", "frequency_filter",
]
