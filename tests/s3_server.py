"""A real S3-compatible server (`moto_server`) on 127.0.0.1 for DVC remote tests.

Auth is enforced (moto's `INITIAL_NO_AUTH_ACTION_COUNT`): the first few requests create an IAM user
and its access key, every later request must be signed with that key. So a wrong secret is refused
with a real 403, as AWS does, instead of moto's default of accepting anything.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.mlflow_server import free_port, stop_mlflow_server

REGION = "us-east-1"
# IAM create_user, create_access_key and put_user_policy, nothing else, run unauthenticated.
_NO_AUTH_ACTIONS = 3


@dataclass
class S3Server:
    endpoint: str
    key_id: str
    secret: str
    proc: subprocess.Popen

    def env(self) -> dict[str, str]:
        """The credentials as DVC (botocore) reads them: environment only, never a config file."""
        return {"AWS_ACCESS_KEY_ID": self.key_id, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_DEFAULT_REGION": REGION}

    def make_bucket(self, name: str) -> str:
        import boto3
        boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id=self.key_id,
                     aws_secret_access_key=self.secret).create_bucket(Bucket=name)
        return f"s3://{name}"


def start_s3_server(tmp_path: Path, timeout_s: float = 60.0) -> S3Server:
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(_NO_AUTH_ACTIONS)}
    log_path = Path(tmp_path) / f"moto-{port}.log"
    log = open(log_path, "ab")
    moto = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    log.close()
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}:\n{log_path.read_text()[-2000:]}")
        try:  # any HTTP answer (moto's dashboard, or an auth error) means it is up; uses no auth action
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).close()
            break
        except urllib.error.HTTPError:
            break
        except OSError:
            if time.monotonic() > deadline:
                stop_s3_server(proc)
                raise RuntimeError(f"moto_server at {endpoint} did not answer in {timeout_s:.0f} s") from None
            time.sleep(0.2)
    try:
        iam = boto3.client("iam", endpoint_url=endpoint, region_name=REGION, aws_access_key_id="bootstrap",
                           aws_secret_access_key="bootstrap")
        iam.create_user(UserName="ci")
        key = iam.create_access_key(UserName="ci")["AccessKey"]
        iam.put_user_policy(UserName="ci", PolicyName="all", PolicyDocument=(
            '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}'))
    except BaseException:
        stop_s3_server(proc)  # its own session: nothing else would ever stop it
        raise
    return S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"], proc)


def stop_s3_server(proc: subprocess.Popen) -> None:
    """Stop moto_server's process group: the same stop as the MLflow server's."""
    stop_mlflow_server(proc)
