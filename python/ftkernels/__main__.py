"""``python -m ftkernels``: the doctor (``ftk doctor``), for bug reports."""

import sys

from ftkernels.apps.doctor import main

sys.exit(main())
