//! MQTT topic templates (`mqtt.topics`, DESIGN §6a): which topics MQTT
//! ingest subscribes, and how a topic gives the device id and tags.
//!
//! A template is a topic filter whose levels may be named: `{device_id}`
//! (exactly once) and `{tag:NAME}` match one level each and give the
//! device id and the tag `NAME`; `+` and `#` keep their MQTT meaning; any
//! other level is literal. `site/{tag:site}/line/{tag:line}/{device_id}/data`
//! subscribes `site/+/line/+/+/data`. A topic is read by the first template
//! it matches; one that matches none is refused (reason `invalid_topic`).

/// The default template.
pub const DEFAULT_TEMPLATE: &str = "devices/{device_id}/telemetry";
/// Longest template, and most templates.
const MAX_TEMPLATE: usize = 1024;
const MAX_TEMPLATES: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Literal(String),
    Plus,
    Hash,
    Device,
    Tag(String),
}

/// One parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    text: String,
    levels: Vec<Level>,
    filter: String,
}

/// What a topic gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicMatch {
    /// The device id (still to be checked like any device id).
    pub device_id: String,
    /// `(name, value)` per `{tag:NAME}` level.
    pub tags: Vec<(String, String)>,
}

impl Template {
    /// Parses one template; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<Template, String> {
        if text.is_empty() || text.len() > MAX_TEMPLATE {
            return Err(format!("{text:?}: a template is 1 to {MAX_TEMPLATE} bytes"));
        }
        if text.contains('\0') {
            return Err(format!("{text:?}: NUL is not allowed in a topic"));
        }
        let parts: Vec<&str> = text.split('/').collect();
        let mut levels = Vec::with_capacity(parts.len());
        let mut devices = 0;
        for (i, p) in parts.iter().enumerate() {
            let level = match *p {
                "+" => Level::Plus,
                "#" if i + 1 == parts.len() => Level::Hash,
                "#" => return Err(format!("{text:?}: '#' must be the last level")),
                "{device_id}" => {
                    devices += 1;
                    Level::Device
                }
                p if p.starts_with("{tag:") && p.ends_with('}') => {
                    let name = &p[5..p.len() - 1];
                    if name.is_empty()
                        || name.len() > crate::ingest::validate::MAX_NAME
                        || name.chars().any(|c| c.is_control() || "{}+#/".contains(c))
                    {
                        return Err(format!("{text:?}: {p} does not name a tag"));
                    }
                    if levels.contains(&Level::Tag(name.to_string())) {
                        return Err(format!("{text:?}: tag {name:?} is named twice"));
                    }
                    Level::Tag(name.to_string())
                }
                p if p.contains(['{', '}', '+', '#']) => {
                    return Err(format!(
                        "{text:?}: level {p:?}: '{{device_id}}', '{{tag:NAME}}', '+' and '#' must fill a whole level"
                    ))
                }
                p => Level::Literal(p.to_string()),
            };
            levels.push(level);
        }
        if devices != 1 {
            return Err(format!(
                "{text:?}: a template names {{device_id}} exactly once"
            ));
        }
        let filter = levels
            .iter()
            .map(|l| match l {
                Level::Literal(s) => s.as_str(),
                Level::Hash => "#",
                _ => "+",
            })
            .collect::<Vec<_>>()
            .join("/");
        Ok(Template {
            text: text.to_string(),
            levels,
            filter,
        })
    }

    /// The subscription filter.
    pub fn filter(&self) -> &str {
        &self.filter
    }

    /// As written.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// What `topic` gives, if it matches.
    pub fn read(&self, topic: &str) -> Option<TopicMatch> {
        let mut parts = topic.split('/');
        let mut device = None;
        let mut tags = Vec::new();
        for level in &self.levels {
            if *level == Level::Hash {
                return device.map(|device_id| TopicMatch { device_id, tags });
            }
            let part = parts.next()?;
            match level {
                Level::Literal(l) if l != part => return None,
                Level::Device => device = Some(part.to_string()),
                Level::Tag(name) => tags.push((name.clone(), part.to_string())),
                _ => {}
            }
        }
        if parts.next().is_some() {
            return None;
        }
        device.map(|device_id| TopicMatch { device_id, tags })
    }
}

/// The templates in force, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics(Vec<Template>);

impl Default for Topics {
    fn default() -> Self {
        Topics(vec![Template::parse(DEFAULT_TEMPLATE).expect("valid")])
    }
}

impl Topics {
    /// Parses `mqtt.topics`.
    pub fn parse(list: &[String]) -> Result<Topics, String> {
        if list.is_empty() || list.len() > MAX_TEMPLATES {
            return Err(format!("give 1 to {MAX_TEMPLATES} templates"));
        }
        list.iter()
            .map(|t| Template::parse(t))
            .collect::<Result<Vec<_>, _>>()
            .map(Topics)
    }

    /// From the older `mqtt.topic`, a filter whose second level is the
    /// device id: that level becomes `{device_id}` and the filter is kept
    /// as written.
    pub fn from_filter(filter: &str) -> Result<Topics, String> {
        let mut parts: Vec<String> = filter.split('/').map(str::to_string).collect();
        match parts.get(1).map(String::as_str) {
            Some("#") => {
                parts[1] = "{device_id}".into();
                parts.push("#".into());
            }
            Some(_) => parts[1] = "{device_id}".into(),
            None => {
                return Err(format!(
                    "{filter:?}: the device id is the second level, and there is none"
                ))
            }
        }
        let mut t = Template::parse(&parts.join("/"))?;
        t.filter = filter.to_string();
        Ok(Topics(vec![t]))
    }

    /// The subscription filters (one per template, duplicates once).
    pub fn filters(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for t in &self.0 {
            if !out.iter().any(|f| f == t.filter()) {
                out.push(t.filter().to_string());
            }
        }
        out
    }

    /// What the first matching template reads from `topic`.
    pub fn read(&self, topic: &str) -> Option<TopicMatch> {
        self.0.iter().find_map(|t| t.read(topic))
    }

    /// The templates as written.
    pub fn texts(&self) -> Vec<String> {
        self.0.iter().map(|t| t.text().to_string()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(device: &str, tags: &[(&str, &str)]) -> Option<TopicMatch> {
        Some(TopicMatch {
            device_id: device.into(),
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
    }

    #[test]
    fn templates_give_the_device_and_tags() {
        let t = Topics::parse(&[
            "devices/{device_id}/telemetry".into(),
            "site/{tag:site}/line/{tag:line}/{device_id}/data".into(),
            "raw/+/{device_id}/#".into(),
        ])
        .unwrap();
        assert_eq!(
            t.filters(),
            ["devices/+/telemetry", "site/+/line/+/+/data", "raw/+/+/#"]
        );
        assert_eq!(t.read("devices/pump-1/telemetry"), m("pump-1", &[]));
        assert_eq!(
            t.read("site/north/line/2/pump-1/data"),
            m("pump-1", &[("site", "north"), ("line", "2")])
        );
        assert_eq!(t.read("raw/x/pump-2"), m("pump-2", &[]));
        assert_eq!(t.read("raw/x/pump-2/a/b"), m("pump-2", &[]));
        for miss in [
            "devices/pump-1",
            "devices/pump-1/telemetry/extra",
            "site/north/line/2/pump-1/other",
            "other/pump-1/telemetry",
            "",
        ] {
            assert_eq!(t.read(miss), None, "{miss}");
        }
    }

    #[test]
    fn bad_templates_are_refused_with_a_reason() {
        for (bad, says) in [
            ("devices/+/telemetry", "exactly once"),
            ("a/{device_id}/{device_id}", "exactly once"),
            ("a/#/{device_id}", "last level"),
            ("a/x{device_id}", "whole level"),
            ("a/{tag:}/{device_id}", "does not name a tag"),
            ("a/{tag:s}/{tag:s}/{device_id}", "named twice"),
            ("", "1 to"),
        ] {
            let e = Template::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        assert!(Topics::parse(&[]).is_err());
    }

    #[test]
    fn the_older_single_filter_keeps_working() {
        let t = Topics::from_filter("devices/+/telemetry").unwrap();
        assert_eq!(t, Topics::default());
        let t = Topics::from_filter("plant/#").unwrap();
        assert_eq!(t.filters(), ["plant/#"]);
        assert_eq!(t.read("plant/dev-9/x/y"), m("dev-9", &[]));
        let t = Topics::from_filter("devices/pump-1/telemetry").unwrap();
        assert_eq!(t.filters(), ["devices/pump-1/telemetry"]);
        assert_eq!(t.read("devices/pump-1/telemetry"), m("pump-1", &[]));
        assert!(Topics::from_filter("devices").is_err());
    }
}
