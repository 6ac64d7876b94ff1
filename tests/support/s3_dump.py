"""Reads every object of an S3 bucket with boto3 and prints one JSON line per
record: {"key": object key, "etag": ETag, "record": canonical record}.

usage: s3_dump.py ENDPOINT BUCKET
"""
import gzip
import json
import sys

import boto3

endpoint, bucket = sys.argv[1], sys.argv[2]
s3 = boto3.client(
    "s3",
    endpoint_url=endpoint,
    aws_access_key_id="test",
    aws_secret_access_key="test",
    region_name="us-east-1",
)
for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
    for obj in page.get("Contents", []):
        got = s3.get_object(Bucket=bucket, Key=obj["Key"])
        for line in gzip.decompress(got["Body"].read()).decode().splitlines():
            print(json.dumps({"key": obj["Key"], "etag": got["ETag"], "record": json.loads(line)}))
