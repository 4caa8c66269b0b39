//! In-memory tickets and contacts of the fake Desk.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

/// Tickets and contacts known to the fake Desk.
pub(super) struct Store {
    pub(super) tickets: Vec<Value>,
    pub(super) contacts: Vec<Value>,
    next_id: u64,
    next_ticket_number: u64,
}

impl Store {
    /// A store seeded with 3 tickets and 2 contacts.
    pub(super) fn seeded() -> Store {
        let mut s = Store {
            tickets: Vec::new(),
            contacts: Vec::new(),
            next_id: 189_200_000_000_100_001,
            next_ticket_number: 101,
        };
        let c1 = s.add_contact(
            Some("Lawrence"),
            "Morris",
            Some("lawrence.morris@zylker.example"),
        );
        let c2 = s.add_contact(Some("Jade"), "Tran", Some("jade.tran@zylker.example"));
        let seeded_time = "2026-11-28T10:00:00.000Z";
        s.add_ticket(
            "Unable to log in to the portal",
            "Open",
            &c1,
            seeded_time,
            "Email",
        );
        s.add_ticket(
            "Refund request for order #4521",
            "On Hold",
            &c2,
            seeded_time,
            "Email",
        );
        s.add_ticket(
            "Feature request: dark mode",
            "Open",
            &c1,
            seeded_time,
            "Email",
        );
        s
    }

    fn new_id(&mut self) -> String {
        let id = self.next_id;
        self.next_id += 1;
        id.to_string()
    }

    /// Adds a contact; returns its id.
    pub(super) fn add_contact(
        &mut self,
        first: Option<&str>,
        last: &str,
        email: Option<&str>,
    ) -> String {
        let id = self.new_id();
        self.contacts.push(json!({
            "id": id, "firstName": first, "lastName": last, "email": email,
        }));
        id
    }

    /// Adds a ticket; returns it.
    pub(super) fn add_ticket(
        &mut self,
        subject: &str,
        status: &str,
        contact: &str,
        at: &str,
        ch: &str,
    ) -> Value {
        let id = self.new_id();
        let number = self.next_ticket_number;
        self.next_ticket_number += 1;
        let t = json!({
            "id": id, "ticketNumber": number.to_string(), "subject": subject, "status": status,
            "contactId": contact, "createdTime": at, "channel": ch,
        });
        self.tickets.push(t.clone());
        t
    }
}

/// Current UTC time as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub(super) fn now_iso8601() -> String {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant), valid for dates after 1970.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}
