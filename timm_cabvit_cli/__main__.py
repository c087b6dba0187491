"""`python -m timm_cabvit_cli`, the same as `timm-cabvit`."""
import sys

from . import main

sys.exit(main())
