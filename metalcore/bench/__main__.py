import sys

from metalcore.bench.harness import main

sys.exit(main())
