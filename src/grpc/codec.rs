//! The gRPC codec of logd's services: prost's, except that a message that
//! does not decode (invalid UTF-8 in a string field, a `Struct` nested past
//! prost's recursion limit, a truncated field) is answered with
//! `INVALID_ARGUMENT` naming the message, instead of tonic's `INTERNAL
//! "failed to decode Protobuf message"`.
//!
//! A decoder lives for one call, so it knows the index of each message on a
//! stream: the service's stream index of the same frame. On a stream the
//! service then settles what came before the bad message (bidi acks it; the
//! client-streaming error counts it), as for a message over
//! `LOGD_MAX_MESSAGE_BYTES`. A unary `LogBatch` whose frame N does not
//! decode reaches the handler as its frames before N followed by a marker
//! frame ([`decode_failure`] tells it apart: its session id is a random
//! per-process value no client knows); the handler makes frames 0..N
//! durable, then answers `INVALID_ARGUMENT` naming frame N with their count.

use std::any::TypeId;
use std::marker::PhantomData;

use prost::Message;
use prost::bytes::Buf;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstEncoder};

use crate::pb::{LogBatch, LogFrame};

/// [`tonic_prost::ProstCodec`] with precise decode errors (see the module doc).
#[derive(Debug, Clone)]
pub struct LogdCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for LogdCodec<T, U> {
    fn default() -> Self {
        LogdCodec(PhantomData)
    }
}

impl<T, U> Codec for LogdCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = LogdDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::default().encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        LogdDecoder {
            decoded: 0,
            _pd: PhantomData,
        }
    }
}

/// Decodes one call's messages, counting them.
#[derive(Debug)]
pub struct LogdDecoder<U> {
    /// Messages decoded so far on this call: the next message's index.
    decoded: u64,
    _pd: PhantomData<U>,
}

impl<U: Message + Default + 'static> Decoder for LogdDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // The message is one contiguous slice (tonic buffers it in a
        // BytesMut): decode from it in place, and keep it for the error.
        let len = buf.remaining();
        let decoded = {
            let raw = buf.chunk();
            if raw.len() == len {
                Some(self.decode_slice(raw))
            } else {
                None
            }
        };
        let decoded = match decoded {
            Some(d) => {
                buf.advance(len);
                d
            }
            None => {
                let raw = buf.copy_to_bytes(len);
                self.decode_slice(&raw)
            }
        };
        decoded.map(Some)
    }
}

impl<U: Message + Default + 'static> LogdDecoder<U> {
    fn decode_slice(&mut self, raw: &[u8]) -> Result<U, Status> {
        match U::decode(raw) {
            Ok(m) => {
                self.decoded += 1;
                Ok(m)
            }
            Err(e) => {
                if TypeId::of::<U>() == TypeId::of::<LogBatch>()
                    && let Some((frames, bad, why)) = frames_before_the_bad_one(raw)
                {
                    let reason = format!(
                        "frame {bad} of the batch does not decode as a LogFrame: {why}; \
                         frames from {bad} on were not accepted"
                    );
                    let mut frames = frames;
                    frames.push(LogFrame {
                        session_id: failure_mark().to_owned(),
                        content: reason,
                        ..Default::default()
                    });
                    // U is LogBatch (checked above): hand it over as U.
                    let batch = LogBatch { frames }.encode_to_vec();
                    self.decoded += 1;
                    return U::decode(batch.as_slice())
                        .map_err(|e| Status::internal(format!("re-encoding a partial batch: {e}")));
                }
                Err(Status::invalid_argument(describe::<U>(self.decoded, raw, &e)))
            }
        }
    }
}

/// The session id of the marker frame: random per process (128 bits), so no
/// client can send it.
fn failure_mark() -> &'static str {
    static MARK: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    MARK.get_or_init(|| format!("logd-decode-failure-{:032x}", rand::random::<u128>()))
}

/// If `frame` is the marker of a frame that did not decode, the reason.
pub fn decode_failure(frame: &LogFrame) -> Option<&str> {
    (frame.session_id == failure_mark()).then_some(frame.content.as_str())
}

/// The message for a decode failure of message `index` of a call.
fn describe<U: 'static>(index: u64, raw: &[u8], e: &prost::DecodeError) -> String {
    if TypeId::of::<U>() == TypeId::of::<LogFrame>() {
        format!("stream message {index} does not decode as a LogFrame: {e}")
    } else if TypeId::of::<U>() == TypeId::of::<LogBatch>() {
        match frames_before_the_bad_one(raw) {
            Some((_, frame, why)) => format!(
                "frame {frame} of the batch does not decode as a LogFrame: {why}; \
                 the batch was refused whole (none of its frames was written)"
            ),
            None => format!(
                "the batch does not decode as a LogBatch: {e}; \
                 the batch was refused whole (none of its frames was written)"
            ),
        }
    } else {
        let name = std::any::type_name::<U>().rsplit("::").next().unwrap_or("message");
        format!("request does not decode as a {name}: {e}")
    }
}

/// Reads a protobuf varint.
fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// The frames of an encoded `LogBatch` before the first that does not
/// decode, that one's index and the reason; None when every entry decodes
/// or the outer framing itself is broken.
fn frames_before_the_bad_one(mut buf: &[u8]) -> Option<(Vec<LogFrame>, usize, prost::DecodeError)> {
    let mut good = Vec::new();
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let len = match key & 7 {
            0 => {
                varint(&mut buf)?;
                0
            }
            1 => 8,
            2 => usize::try_from(varint(&mut buf)?).ok()?,
            5 => 4,
            _ => return None,
        };
        let (field, rest) = (buf.get(..len)?, &buf[len..]);
        buf = rest;
        if key >> 3 == 1 && key & 7 == 2 {
            match LogFrame::decode(field) {
                Ok(f) => good.push(f),
                Err(e) => {
                    let bad = good.len();
                    return Some((good, bad, e));
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_frame_of_a_batch_that_does_not_decode_is_named() {
        let f = |c: &str| LogFrame {
            session_id: "s".into(),
            content: c.into(),
            ..Default::default()
        };
        let mut raw = LogBatch {
            frames: vec![f("ok"), f("ok"), f("BAD!"), f("BAD!")],
        }
        .encode_to_vec();
        let at = raw.windows(4).position(|w| w == b"BAD!").unwrap();
        raw[at..at + 4].copy_from_slice(&[0xff, 0xfe, 0xfd, 0xfc]);
        assert!(LogBatch::decode(raw.as_slice()).is_err());
        let (good, index, why) = frames_before_the_bad_one(&raw).expect("a bad frame");
        assert_eq!((good.len(), index), (2, 2));
        assert!(why.to_string().contains("UTF-8"), "{why}");
        assert!(describe::<LogBatch>(0, &raw, &why).starts_with("frame 2 of the batch"));
    }
}
