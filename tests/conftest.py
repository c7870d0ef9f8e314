
# Bus fixtures (GATEWAY): memory_bus, rabbit_bus, bus (both), rabbitmq_url, bus_namespace.
from fastserve.common.testing import *  # noqa: E402,F401,F403
