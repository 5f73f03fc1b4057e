from meshshield._proto.envoy.extensions.transport_sockets.tls.v3 import common_pb2 as _common_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Secret(_message.Message):
    __slots__ = ("name", "tls_certificate", "validation_context")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TLS_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    name: str
    tls_certificate: _common_pb2.TlsCertificate
    validation_context: _common_pb2.CertificateValidationContext
    def __init__(self, name: _Optional[str] = ..., tls_certificate: _Optional[_Union[_common_pb2.TlsCertificate, _Mapping]] = ..., validation_context: _Optional[_Union[_common_pb2.CertificateValidationContext, _Mapping]] = ...) -> None: ...
