"""Build the boto3 client and s3transfer manager of an ``s3`` tier (imported by ``open()`` only).

Credentials are resolved by boto3's standard chain (environment, shared config files and the
optional ``profile``, container and instance roles); they never pass through KVortex options.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvortex_backends.s3 import S3Options


def make_client(options: S3Options) -> Any:
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(profile_name=options.profile, region_name=options.region)
    config = Config(
        # Our pool threads plus s3transfer's own part threads each hold one connection.
        max_pool_connections=options.max_concurrency * 2,
        connect_timeout=options.connect_timeout,
        read_timeout=options.read_timeout,
        retries={"total_max_attempts": options.max_attempts, "mode": "standard"},
        s3={"addressing_style": options.addressing_style},
        tcp_keepalive=True,
    )
    return session.client("s3", endpoint_url=options.endpoint_url, verify=options.verify, config=config)


def make_transfer_manager(client: Any, options: S3Options) -> Any:
    """One long-lived multipart manager (its part threads are reused across uploads)."""
    from boto3.s3.transfer import TransferConfig
    from s3transfer.manager import TransferManager

    config = TransferConfig(
        multipart_threshold=int(options.multipart_threshold),
        multipart_chunksize=int(options.multipart_chunksize),
        max_concurrency=options.max_concurrency,
        use_threads=True,
    )
    return TransferManager(client, config)
