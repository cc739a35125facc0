"""The pod runner: the chart's rendered pods run as pods would, without a cluster (see cluster.py)."""

from .cluster import Client, Cluster, Pod, PodFailure
from .grpcurl import Grpc, GrpcError

__all__ = ["Client", "Cluster", "Grpc", "GrpcError", "Pod", "PodFailure"]
