"""pdserve: the CLI, the launcher and the tools above the serving tiers (pdserve/v1 holds the generated wire code).

Every pdserve process starts here, before gRPC loads: gRPC's fork support is switched off. The launcher, the bench
and the tests fork children that exec at once (with a preexec_fn: CPU pinning, a parent-death signal) while their
own gRPC channels are busy; with fork support on, gRPC's post-fork handler restarts its poller in the child, which
can abort there before the exec (grpc/grpc#43055: "epoll_wait error: Bad file descriptor"). Nothing here ever uses
gRPC in a forked child, so nothing is lost."""

import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
