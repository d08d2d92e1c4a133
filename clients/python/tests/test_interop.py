"""Interop: Google's grpcio (C core), not tonic, drives every RPC with plain
generated stubs, plus the standard health service."""

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from logd_client._proto.logging.v1 import admin_pb2, admin_pb2_grpc, logging_pb2 as pb, logging_pb2_grpc as pb_grpc


def test_grpcio_drives_all_three_rpcs_and_health(server):
    ch = grpc.insecure_channel(server.target)
    stub = pb_grpc.LogServiceStub(ch)

    resp = stub.WriteLogBatch(pb.LogBatch(frames=[pb.LogFrame(session_id="io", content="batch")]))
    assert (resp.frames_accepted, resp.sessions[0].first_seq) == (1, 1)

    frames = [pb.LogFrame(session_id="io", content=f"stream {i}") for i in range(10)]
    frames.append(pb.LogFrame(session_id="../etc", content="evil"))
    resp = stub.WriteLogStream(iter(frames))
    assert (resp.frames_accepted, resp.frames_rejected) == (10, 1)
    assert resp.rejections[0].index == 10 and "invalid session_id" in resp.rejections[0].reason

    acks = list(stub.WriteLogBidi(iter([pb.LogFrame(session_id="io", seq=100, content="bidi"),
                                        pb.LogFrame(session_id="io", seq=100, content="dup")])))
    assert acks[-1].through_index == 2
    assert (acks[-1].frames_accepted, acks[-1].frames_duplicate) == (1, 1)

    assert stub.GetSession(pb.SessionRequest(session_id="io")).last_seq == 100
    stats = admin_pb2_grpc.AdminServiceStub(ch).GetStats(admin_pb2.StatsRequest())
    assert stats.frames_accepted == 12

    health = health_pb2_grpc.HealthStub(ch)
    for service in ["", "logging.v1.LogService"]:
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING, service
    ch.close()
    server.stop()
    assert [l["seq"] for l in server.lines("io")] == list(range(1, 12)) + [100]


def test_grpcio_reflection_client_speaking_v1alpha_lists_services_and_resolves_the_otlp_service(server):
    """grpcio-reflection's client speaks only grpc.reflection.v1alpha."""
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(server.target) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = set(db.get_services())
        for want in ["logging.v1.LogService", "logging.v1.AdminService", "grpc.health.v1.Health",
                     "opentelemetry.proto.collector.logs.v1.LogsService"]:
            assert want in services, f"{want} missing from {sorted(services)}"
        pool = DescriptorPool(db)
        export = pool.FindServiceByName("opentelemetry.proto.collector.logs.v1.LogsService").FindMethodByName("Export")
        assert export.input_type.full_name == "opentelemetry.proto.collector.logs.v1.ExportLogsServiceRequest"
