import sys

from service.process import use_process_metrics

# Before prometheus_client is first imported: the engine process and every HTTP front write
# their metrics where /metrics sums them.
use_process_metrics()

from service.server import main  # noqa: E402

sys.exit(main())
