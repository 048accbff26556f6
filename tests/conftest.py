"""Shared test settings.

torch runs single-threaded in tests: the tiny models are far too small to gain from threads, and on a
shared 2-core machine a second thread turns millisecond calls into seconds of contention.
"""

import torch

torch.set_num_threads(1)
