import sys

from meshctl.agent.daemon import main

sys.exit(main())
