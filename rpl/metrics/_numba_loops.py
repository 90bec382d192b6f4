"""The numba loop behind ``_kernels.count_bins`` (this module imports numba: import it lazily)."""
import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def count_bins(bits, labels, hist, shift, off):
    """hist[2 * bin + label] += 1 for every pixel with label 0 or 1 (void and anything else
    skipped); the bin is ``HistogramAccumulator._codes``' (positives round down, negatives up,
    so -0.0 == +0.0). Every int32 bit pattern maps inside ``hist`` (|bin - off| <= off), so no
    write can leave it. Returns the lowest and highest index written (size, -1 when none)."""
    ceil = (1 << shift) - 1
    lo, hi = hist.size, -1
    for i in range(bits.size):
        lab = labels[i]
        if lab > 1:
            continue
        b = np.int64(bits[i])
        neg = b >> 63                                  # -1 for negative floats, else 0
        q = ((b & 0x7FFFFFFF) + (neg & ceil)) >> shift  # |bin|, without a branch on the sign
        code = 2 * (off + ((q ^ neg) - neg)) + lab
        hist[code] += 1
        lo = min(lo, code)
        hi = max(hi, code)
    return lo, hi
