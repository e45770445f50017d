"""The few messages of Envoy's rate limit API that riprap's rate limit service speaks.

Why not `xds-protos`: it ships a stale copy of opentelemetry-proto's generated files in the
same `opentelemetry/proto/` package directory, so installing it next to OpenTelemetry breaks
the OTLP exporter (`ImportError: cannot import name 'InstrumentationScope'`); see
grpc/grpc#42926 (open), its fix grpc/grpc#42429 (not merged) and
open-telemetry/opentelemetry-python#4843. riprap needs four messages of it, so they are
declared here, with protobuf itself.

The descriptors below keep Envoy's package, message names and field numbers (which is all
the wire format depends on) for the fields riprap reads and writes:

- `envoy/config/core/v3/base.proto`: `HeaderValue` (key 1, value 2);
- `envoy/extensions/common/ratelimit/v3/ratelimit.proto`: `RateLimitDescriptor` (entries 1)
  and its `Entry` (key 1, value 2);
- `envoy/service/ratelimit/v3/rls.proto`: `RateLimitRequest` (domain 1, descriptors 2,
  hits_addend 3), `RateLimitResponse` (overall_code 1, statuses 2, response_headers_to_add 3,
  request_headers_to_add 4) with its `Code` enum (UNKNOWN 0, OK 1, OVER_LIMIT 2) and
  `DescriptorStatus` (code 1, limit_remaining 3, duration_until_reset 4), and the service
  `RateLimitService.ShouldRateLimit`.

Fields Envoy may send that are not declared here are kept as unknown fields and ignored.
They live in a private descriptor pool, so they never clash with another copy of the same
files (xds-protos, if still installed) in protobuf's default pool.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, duration_pb2, message_factory

_F = descriptor_pb2.FieldDescriptorProto

SERVICE_NAME = "envoy.service.ratelimit.v3.RateLimitService"
METHOD_NAME = "ShouldRateLimit"
METHOD_PATH = f"/{SERVICE_NAME}/{METHOD_NAME}"  # the gRPC path Envoy calls


def _field(message: descriptor_pb2.DescriptorProto, name: str, number: int, kind: int, *,
           type_name: str = "", repeated: bool = False) -> None:
    field = message.field.add(name=name, number=number, type=kind,
                              label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL)
    if type_name:
        field.type_name = type_name


def _file(name: str, package: str, *deps: str) -> descriptor_pb2.FileDescriptorProto:
    return descriptor_pb2.FileDescriptorProto(name=name, package=package, syntax="proto3",
                                              dependency=list(deps))


def _base() -> descriptor_pb2.FileDescriptorProto:
    f = _file("envoy/config/core/v3/base.proto", "envoy.config.core.v3")
    header = f.message_type.add(name="HeaderValue")
    _field(header, "key", 1, _F.TYPE_STRING)
    _field(header, "value", 2, _F.TYPE_STRING)
    return f


def _ratelimit() -> descriptor_pb2.FileDescriptorProto:
    f = _file("envoy/extensions/common/ratelimit/v3/ratelimit.proto",
              "envoy.extensions.common.ratelimit.v3")
    descriptor = f.message_type.add(name="RateLimitDescriptor")
    entry = descriptor.nested_type.add(name="Entry")
    _field(entry, "key", 1, _F.TYPE_STRING)
    _field(entry, "value", 2, _F.TYPE_STRING)
    _field(descriptor, "entries", 1, _F.TYPE_MESSAGE, repeated=True,
           type_name=".envoy.extensions.common.ratelimit.v3.RateLimitDescriptor.Entry")
    return f


def _rls() -> descriptor_pb2.FileDescriptorProto:
    f = _file("envoy/service/ratelimit/v3/rls.proto", "envoy.service.ratelimit.v3",
              "envoy/config/core/v3/base.proto",
              "envoy/extensions/common/ratelimit/v3/ratelimit.proto",
              "google/protobuf/duration.proto")
    pkg = ".envoy.service.ratelimit.v3"
    request = f.message_type.add(name="RateLimitRequest")
    _field(request, "domain", 1, _F.TYPE_STRING)
    _field(request, "descriptors", 2, _F.TYPE_MESSAGE, repeated=True,
           type_name=".envoy.extensions.common.ratelimit.v3.RateLimitDescriptor")
    _field(request, "hits_addend", 3, _F.TYPE_UINT32)

    response = f.message_type.add(name="RateLimitResponse")
    code = response.enum_type.add(name="Code")
    for number, name in enumerate(("UNKNOWN", "OK", "OVER_LIMIT")):
        code.value.add(name=name, number=number)
    status = response.nested_type.add(name="DescriptorStatus")
    _field(status, "code", 1, _F.TYPE_ENUM, type_name=f"{pkg}.RateLimitResponse.Code")
    _field(status, "limit_remaining", 3, _F.TYPE_UINT32)
    _field(status, "duration_until_reset", 4, _F.TYPE_MESSAGE,
           type_name=".google.protobuf.Duration")
    _field(response, "overall_code", 1, _F.TYPE_ENUM, type_name=f"{pkg}.RateLimitResponse.Code")
    _field(response, "statuses", 2, _F.TYPE_MESSAGE, repeated=True,
           type_name=f"{pkg}.RateLimitResponse.DescriptorStatus")
    _field(response, "response_headers_to_add", 3, _F.TYPE_MESSAGE, repeated=True,
           type_name=".envoy.config.core.v3.HeaderValue")
    _field(response, "request_headers_to_add", 4, _F.TYPE_MESSAGE, repeated=True,
           type_name=".envoy.config.core.v3.HeaderValue")

    service = f.service.add(name="RateLimitService")
    service.method.add(name=METHOD_NAME, input_type=f"{pkg}.RateLimitRequest",
                       output_type=f"{pkg}.RateLimitResponse")
    return f


def _build_pool() -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    duration = descriptor_pb2.FileDescriptorProto()
    duration_pb2.DESCRIPTOR.CopyToProto(duration)
    for f in (duration, _base(), _ratelimit(), _rls()):
        pool.Add(f)
    return pool


POOL = _build_pool()


def _message(full_name: str) -> Any:
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(full_name))


HeaderValue: Any = _message("envoy.config.core.v3.HeaderValue")
RateLimitDescriptor: Any = _message("envoy.extensions.common.ratelimit.v3.RateLimitDescriptor")
RateLimitRequest: Any = _message("envoy.service.ratelimit.v3.RateLimitRequest")
RateLimitResponse: Any = _message("envoy.service.ratelimit.v3.RateLimitResponse")

OK: int = RateLimitResponse.OK
OVER_LIMIT: int = RateLimitResponse.OVER_LIMIT


def set_duration(duration: Any, seconds: float) -> None:
    """Set a `google.protobuf.Duration` field to `seconds` (>= 0)."""
    nanos = max(0, int(seconds * 1e9))
    duration.seconds, duration.nanos = divmod(nanos, 1_000_000_000)


def duration_seconds(duration: Any) -> float:
    return float(duration.seconds) + float(duration.nanos) / 1e9


__all__ = ["METHOD_NAME", "METHOD_PATH", "OK", "OVER_LIMIT", "POOL", "SERVICE_NAME",
           "HeaderValue", "RateLimitDescriptor", "RateLimitRequest", "RateLimitResponse",
           "duration_seconds", "set_duration"]
