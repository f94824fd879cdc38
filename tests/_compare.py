"""Comparisons of optimizer updates that float32 noise cannot break."""
from __future__ import annotations

import jax
import numpy as np


def assert_same_gradient(got_opt_state, want_opt_state, got_norm, want_norm, msg=""):
    """Two updates from the same state saw the same gradient: compared through Adam's
    moments (linear and quadratic in it) and the gradient norm, not the new weights.
    Adam's first step is lr * g / (|g| + eps), which turns float32 noise on a gradient
    element near eps into a weight difference of up to ~lr (CI: 3e-4 relative on one
    element of 256). Each moment is bounded relative to its largest element."""
    np.testing.assert_allclose(float(got_norm), float(want_norm), rtol=1e-5, err_msg=msg)
    for a, b in zip(jax.tree.leaves(got_opt_state), jax.tree.leaves(want_opt_state),
                    strict=True):
        a, b = np.asarray(a), np.asarray(b)
        if np.issubdtype(b.dtype, np.floating):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max(),
                                       err_msg=msg)
        else:
            np.testing.assert_array_equal(a, b, err_msg=msg)
