#!/usr/bin/env python
"""Train a LoRA on SD3 with ADRPO.

    python train_sd3_adrpo.py --config configs/tiny.yaml [--key value ...]

``--help`` lists every key. See README.md.
"""

import errno
import sys

from sd3_adrpo.config import ConfigError, parse_args


def main(argv=None) -> int:
    try:
        cfg = parse_args(argv).validate()  # before torch and diffusers are imported: a bad input answers at once
        from sd3_adrpo.guards import (AlarmStop, NonFiniteError, TrainingInterrupted, block_late_signals,
                                      restore_signal_handlers)
        from sd3_adrpo.trainer import train

        try:
            train(cfg)
        except TrainingInterrupted as e:
            print(str(e), file=sys.stderr)
            if argv is not None:  # called from Python, which goes on: its own handlers back
                restore_signal_handlers()
            else:  # a script just exits: a late signal, even during the interpreter's shutdown, cannot kill it mid-exit
                block_late_signals()
            return e.exit_code
        except NonFiniteError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except AlarmStop as e:
            print(f"stopped by an alarm: {e}", file=sys.stderr)
            return e.exit_code
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            print(f"error: the disk is full ({e.filename or 'while writing'}); free some space, then continue with "
                  "--resume_from latest (checkpoints are written atomically: the last complete one is intact)",
                  file=sys.stderr)
            return 2
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
