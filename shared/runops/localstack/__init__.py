"""Local servers for development and tests, started as processes on 127.0.0.1 (no Docker):
two PostgreSQL clusters with streaming replicas, Redis (standalone and cluster), moto's S3."""

from runops.localstack.postgres import PostgresCluster, PostgresDatabase
from runops.localstack.process import StackError
from runops.localstack.redis import RedisCluster, RedisServer
from runops.localstack.s3 import S3Server, ensure_bucket
from runops.localstack.stack import (
    CONTROLPLANE_DATABASE,
    RUNOPS_DATABASE,
    ExternalServers,
    LocalStack,
    printing_progress,
    run_coroutine,
)

__all__ = [
    "CONTROLPLANE_DATABASE",
    "RUNOPS_DATABASE",
    "ExternalServers",
    "LocalStack",
    "PostgresCluster",
    "PostgresDatabase",
    "RedisCluster",
    "RedisServer",
    "S3Server",
    "StackError",
    "ensure_bucket",
    "printing_progress",
    "run_coroutine",
]
