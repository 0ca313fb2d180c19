"""``python -m LungGradCAMLib.cli`` (what ``torchrun ... -m LungGradCAMLib.cli batch`` runs)."""

import sys

from . import main

sys.exit(main())
