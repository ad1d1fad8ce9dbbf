import sys

from kernel.daemon import main

sys.exit(main())
