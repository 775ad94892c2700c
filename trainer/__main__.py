import sys

from trainer.commands import main

sys.exit(main())
