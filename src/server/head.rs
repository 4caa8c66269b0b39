//! A request head's bytes, moved out of hyper's read buffer into one allocation of their
//! own as the request arrives.
//!
//! hyper parses an HTTP/1 head in place: the URI and every header value are slices of the
//! connection's 8 KiB read buffer. While the request is in flight, hyper keeps reading the
//! connection to notice a client that leaves (which cancels the request), and that read
//! needs room in the buffer: with the head still referring to it, hyper allocates a second
//! buffer for every request in flight. Once nothing refers to the first one, hyper reuses
//! it in place. A head copied out costs one small allocation instead of 8 KiB per request
//! (README "Performance", "A request head of its own").

use bytes::{BufMut, Bytes, BytesMut};
use http::uri::PathAndQuery;
use http::{HeaderValue, Request, Uri, Version};

/// Gives `req`'s URI and header values their own allocation, so that hyper's read buffer
/// is free again. HTTP/1 only: that is where hyper reads for a leaving client while a
/// request is in flight.
pub(super) fn detach<B>(req: &mut Request<B>) {
    if req.version() > Version::HTTP_11 {
        return;
    }
    let uri = req.uri();
    // Origin-form (`/path?query`), what clients send a reverse proxy, goes in the shared
    // copy; `/` and `*` are static already.
    let origin_form = uri.scheme().is_none() && uri.authority().is_none();
    let pq_len = match uri.path_and_query() {
        Some(pq) if origin_form && pq.as_str().len() > 1 => pq.as_str().len(),
        _ => 0,
    };
    let values_len: usize = req.headers().values().map(|v| v.len()).sum();
    let mut copy = BytesMut::with_capacity(pq_len + values_len);
    if pq_len > 0
        && let Some(pq) = uri.path_and_query()
    {
        copy.put_slice(pq.as_str().as_bytes());
    }
    for value in req.headers().values() {
        copy.put_slice(value.as_bytes());
    }
    let mut copy: Bytes = copy.freeze();

    if pq_len > 0 {
        if let Ok(pq) = PathAndQuery::from_maybe_shared(copy.split_to(pq_len)) {
            *req.uri_mut() = Uri::from(pq);
        }
    } else if !origin_form && uri.host().is_some() {
        // Absolute- or authority-form (transparent mode, a forward proxy's client): rare,
        // copied on its own.
        if let Ok(own) = Uri::try_from(uri.to_string()) {
            *req.uri_mut() = own;
        }
    }
    for value in req.headers_mut().values_mut() {
        let bytes = copy.split_to(value.len());
        // The bytes were a valid value a moment ago; should they somehow not parse, the
        // original is kept (it only costs the buffer).
        if let Ok(mut own) = HeaderValue::from_maybe_shared(bytes) {
            own.set_sensitive(value.is_sensitive());
            *value = own;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request whose URI and header values are slices of one buffer, as hyper's are.
    fn parsed(head_buffer: &Bytes, uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let slice_of = |s: &str| {
            let start = head_buffer
                .windows(s.len())
                .position(|w| w == s.as_bytes())
                .unwrap();
            head_buffer.slice(start..start + s.len())
        };
        let mut req = Request::new(());
        *req.uri_mut() = Uri::from_maybe_shared(slice_of(uri)).unwrap();
        for (name, value) in headers {
            req.headers_mut().append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_maybe_shared(slice_of(value)).unwrap(),
            );
        }
        req
    }

    /// Whether `b` points into `buffer`.
    fn inside(buffer: &Bytes, b: &[u8]) -> bool {
        let range = buffer.as_ptr_range();
        range.contains(&b.as_ptr())
    }

    #[test]
    fn nothing_of_the_head_refers_to_the_read_buffer_after_it_is_detached() {
        let buffer = Bytes::from(
            b"GET /api/v1/tickets?limit=5 HTTP/1.1\r\nhost: desk.local\r\norgid: 42\r\nx-custom: a\r\nx-custom: b\r\n\r\n"
                .to_vec(),
        );
        let mut req = parsed(
            &buffer,
            "/api/v1/tickets?limit=5",
            &[
                ("host", "desk.local"),
                ("orgid", "42"),
                ("x-custom", "a"),
                ("x-custom", "b"),
            ],
        );
        assert!(inside(&buffer, req.uri().path().as_bytes()));

        detach(&mut req);

        assert_eq!(req.uri(), "/api/v1/tickets?limit=5");
        assert!(!inside(&buffer, req.uri().path().as_bytes()));
        let values: Vec<_> = req
            .headers()
            .iter()
            .map(|(n, v)| (n.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(
            values,
            [
                ("host", "desk.local"),
                ("orgid", "42"),
                ("x-custom", "a"),
                ("x-custom", "b"),
            ]
        );
        for value in req.headers().values() {
            assert!(!inside(&buffer, value.as_bytes()));
        }
        // Only this test's handle is left on the buffer: hyper would reuse it in place.
        let buffer = buffer.try_into_mut();
        assert!(buffer.is_ok(), "the read buffer is referred to no more");
    }

    #[test]
    fn absolute_and_static_uris_and_http2_heads_are_kept_as_they_are_meant() {
        let buffer = Bytes::from(b"GET http://desk.local:8080/api/v1/x?y=1 HTTP/1.1\r\n".to_vec());
        let mut req = parsed(&buffer, "http://desk.local:8080/api/v1/x?y=1", &[]);
        detach(&mut req);
        assert_eq!(req.uri(), "http://desk.local:8080/api/v1/x?y=1");
        assert!(!inside(&buffer, req.uri().path().as_bytes()));

        let mut star = Request::new(());
        *star.uri_mut() = Uri::from_static("*");
        detach(&mut star);
        assert_eq!(star.uri(), "*");

        let buffer = Bytes::from(b"/h2/path".to_vec());
        let mut h2 = parsed(&buffer, "/h2/path", &[]);
        *h2.version_mut() = Version::HTTP_2;
        detach(&mut h2);
        assert!(inside(&buffer, h2.uri().path().as_bytes()));
    }
}
