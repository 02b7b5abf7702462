//! Sessions: `Login` hands out the cookie `vmware_soap_session`; each
//! session owns its container views and property filters, and the state of
//! its `WaitForUpdates` (the version handed out and what it last sent).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use super::envelope::FilterSpec;
use super::value::{MoRef, Val};

/// The session cookie's name.
pub const COOKIE: &str = "vmware_soap_session";
/// A session unused this long is gone (hostd's default).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// The most sessions at once; a new login drops the least recently used.
const MAX_SESSIONS: usize = 256;
/// The most views or filters one session may hold.
pub const MAX_OBJECTS_PER_SESSION: usize = 1024;

/// What the last update of a filter told the client: per object, the
/// value of each property path.
pub type Sent = BTreeMap<MoRef, BTreeMap<String, Val>>;

/// A container view.
#[derive(Debug, Clone)]
pub struct View {
    /// The folder or datacenter.
    pub container: MoRef,
    /// The types listed (all if empty).
    pub types: Vec<String>,
    /// Whether child folders are looked into.
    pub recursive: bool,
}

/// A property filter.
#[derive(Debug, Clone)]
pub struct Filter {
    /// What it watches.
    pub spec: FilterSpec,
    /// What the client was last told.
    pub sent: Sent,
}

/// A logged-in session.
#[derive(Debug)]
pub struct Session {
    /// `UserSession.key`.
    pub key: String,
    /// The user.
    pub user: String,
    /// Seconds since the Unix epoch.
    pub login_time: u64,
    /// When it was last used.
    pub last_used: Instant,
    /// Calls made.
    pub calls: i64,
    /// The client's User-Agent.
    pub user_agent: String,
    /// Container views by ID.
    pub views: HashMap<String, View>,
    /// Property filters by ID.
    pub filters: BTreeMap<String, Filter>,
    /// The last `WaitForUpdates` version handed out (0: none yet).
    pub version: u64,
    /// Set by `CancelWaitForUpdates`.
    pub cancel_wait: bool,
    next_object: u64,
}

impl Session {
    /// A new ID for a view or filter of this session (hostd's shape).
    pub fn object_id(&mut self) -> String {
        self.next_object += 1;
        format!("session[{}]{:08x}", self.key, self.next_object)
    }
}

/// All sessions, by cookie.
#[derive(Debug, Default)]
pub struct Sessions {
    by_cookie: HashMap<String, Session>,
}

impl Sessions {
    /// Starts a session for `user`; returns its cookie.
    pub fn login(&mut self, user: &str, user_agent: &str, now: u64) -> String {
        self.expire();
        if self.by_cookie.len() >= MAX_SESSIONS {
            if let Some(oldest) = self
                .by_cookie
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(c, _)| c.clone())
            {
                self.by_cookie.remove(&oldest);
            }
        }
        let cookie = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let key = uuid::Uuid::new_v4().hyphenated().to_string();
        self.by_cookie.insert(
            cookie.clone(),
            Session {
                key,
                user: user.to_owned(),
                login_time: now,
                last_used: Instant::now(),
                calls: 0,
                user_agent: user_agent.to_owned(),
                views: HashMap::new(),
                filters: BTreeMap::new(),
                version: 0,
                cancel_wait: false,
                next_object: 0,
            },
        );
        cookie
    }

    /// The live session of `cookie`, marked used.
    pub fn get(&mut self, cookie: &str) -> Option<&mut Session> {
        self.expire();
        let s = self.by_cookie.get_mut(cookie)?;
        s.last_used = Instant::now();
        s.calls += 1;
        Some(s)
    }

    /// Ends the session of `cookie` (its views and filters go with it).
    pub fn logout(&mut self, cookie: &str) -> bool {
        self.by_cookie.remove(cookie).is_some()
    }

    fn expire(&mut self) {
        self.by_cookie.retain(|_, s| s.last_used.elapsed() < IDLE_TIMEOUT);
    }
}

/// The session ID in a `Cookie` header, read leniently: pyvmomi sends back
/// the whole `Set-Cookie` value (`vmware_soap_session="..."; Path=/; ...`).
pub fn cookie_session(header: &str) -> Option<String> {
    header.split(';').find_map(|part| {
        let (name, value) = part.split_once('=')?;
        if name.trim() != COOKIE {
            return None;
        }
        let v = value.trim().trim_matches('"').trim();
        (!v.is_empty()).then(|| v.to_owned())
    })
}

/// The `Set-Cookie` value for a session.
pub fn set_cookie(session: &str, secure: bool) -> String {
    format!(
        "{COOKIE}=\"{session}\"; Path=/; HttpOnly;{}",
        if secure { " Secure;" } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_read_leniently() {
        assert_eq!(
            cookie_session("vmware_soap_session=\"abc\"; Path=/; HttpOnly; Secure;").as_deref(),
            Some("abc")
        );
        assert_eq!(cookie_session("a=b; vmware_soap_session=abc").as_deref(), Some("abc"));
        assert_eq!(cookie_session("vmware_soap_session=\"\""), None);
        assert_eq!(cookie_session("other=1"), None);
        assert_eq!(cookie_session(""), None);
    }

    #[test]
    fn sessions_log_in_and_out() {
        let mut s = Sessions::default();
        let c = s.login("root", "test", 0);
        assert_eq!(s.get(&c).unwrap().user, "root");
        let id = s.get(&c).unwrap().object_id();
        assert!(id.starts_with("session["), "{id}");
        assert!(s.logout(&c));
        assert!(s.get(&c).is_none());
        assert!(!s.logout(&c));
    }
}
