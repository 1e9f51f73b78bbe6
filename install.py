"""Run by A1111 at start-up (``python install.py`` with the WebUI root on PYTHONPATH).

Installs only what is missing (peft, onnxruntime) and never upgrades anything already installed;
the decisions live in ``lib_lora_trainer/install_support.py``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lib_lora_trainer.install_support import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
