//! The screen's state and the two pure functions over it: a key press decides an [`Action`], and
//! [`App::render`] draws the state into any ratatui backend (the terminal, or a `TestBackend` in
//! tests). Nothing here reads the project or touches the terminal: the loop in `tui/mod.rs` does.

use ratatui::Frame;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row, Table, TableState, Wrap};

use super::model::{Snapshot, TaskLine, cost, elapsed, one_line};

/// Below this width the agent and cost columns give their room to the note (a phone over SSH).
const NARROW: u16 = 64;

pub struct App {
    pub snapshot: Snapshot,
    /// The selected task, by id, so a refresh that reorders the table keeps it selected.
    pub selected: Option<String>,
    pub detail: Option<Detail>,
    /// A cancel or retry waiting for y/n.
    pub confirm: Option<Ask>,
    /// The last thing said to the user (an action's result, a read error).
    pub message: Option<String>,
    /// A cancel or retry is under way: no second one until it answers.
    pub busy: bool,
    /// Reading a PostgreSQL mirror: there is no folder to write a cancel or retry into.
    pub read_only: bool,
}

pub struct Detail {
    pub id: String,
    pub lines: Vec<String>,
    /// The first line shown.
    pub scroll: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Ask {
    Cancel(String),
    Retry(String),
}

/// What the loop must do after a key.
#[derive(Debug, PartialEq)]
pub enum Action {
    None,
    Quit,
    /// Read this task's detail (and keep it fresh while it is open).
    Open(String),
    Cancel(String),
    Retry(String),
}

impl App {
    pub fn new(snapshot: Snapshot, read_only: bool) -> App {
        let selected = snapshot.tasks.first().map(|t| t.id.clone());
        App {
            snapshot,
            selected,
            detail: None,
            confirm: None,
            message: None,
            busy: false,
            read_only,
        }
    }

    /// A newer snapshot; the selection stays on its task while that task is listed.
    pub fn update(&mut self, snapshot: Snapshot) {
        let index = self.selected_index();
        self.snapshot = snapshot;
        let still = self
            .selected
            .as_ref()
            .is_some_and(|id| self.snapshot.tasks.iter().any(|t| &t.id == id));
        if !still {
            let i = index
                .unwrap_or(0)
                .min(self.snapshot.tasks.len().saturating_sub(1));
            self.selected = self.snapshot.tasks.get(i).map(|t| t.id.clone());
        }
    }

    fn selected_index(&self) -> Option<usize> {
        let id = self.selected.as_ref()?;
        self.snapshot.tasks.iter().position(|t| &t.id == id)
    }

    pub fn selected_task(&self) -> Option<&TaskLine> {
        self.selected_index().map(|i| &self.snapshot.tasks[i])
    }

    fn move_selection(&mut self, by: isize) {
        let n = self.snapshot.tasks.len();
        if n == 0 {
            return;
        }
        let i = self.selected_index().unwrap_or(0) as isize;
        let j = (i + by).clamp(0, n as isize - 1) as usize;
        self.selected = Some(self.snapshot.tasks[j].id.clone());
    }

    /// The task the keys act on: the open one in the detail view, else the selected row.
    fn target(&self) -> Option<String> {
        match &self.detail {
            Some(d) => Some(d.id.clone()),
            None => self.selected.clone(),
        }
    }

    pub fn handle_key(&mut self, key: KeyEvent) -> Action {
        // Raw mode delivers Ctrl-C as a key: it quits, as everywhere else.
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            return Action::Quit;
        }
        if let Some(ask) = self.confirm.take() {
            return match key.code {
                KeyCode::Char('y') | KeyCode::Char('Y') => {
                    self.busy = true;
                    match ask {
                        Ask::Cancel(id) => {
                            self.message = Some(format!("cancelling {id}…"));
                            Action::Cancel(id)
                        }
                        Ask::Retry(id) => {
                            self.message = Some(format!("retrying {id}…"));
                            Action::Retry(id)
                        }
                    }
                }
                _ => {
                    self.message = Some("not done".into());
                    Action::None
                }
            };
        }
        let page = 10;
        match key.code {
            KeyCode::Char('q') => return Action::Quit,
            KeyCode::Char('c') | KeyCode::Char('r') => {
                let Some(id) = self.target() else {
                    return Action::None;
                };
                if self.read_only {
                    self.message = Some(
                        "read-only: cancel and retry act on the project folder, run watch there"
                            .into(),
                    );
                } else if self.busy {
                    self.message = Some("wait for the last action to finish".into());
                } else if key.code == KeyCode::Char('c') {
                    self.confirm = Some(Ask::Cancel(id));
                } else {
                    self.confirm = Some(Ask::Retry(id));
                }
                return Action::None;
            }
            _ => {}
        }
        if let Some(d) = &mut self.detail {
            let last = d.lines.len().saturating_sub(1);
            match key.code {
                KeyCode::Esc | KeyCode::Backspace | KeyCode::Left => self.detail = None,
                KeyCode::Up | KeyCode::Char('k') => d.scroll = d.scroll.saturating_sub(1),
                KeyCode::Down | KeyCode::Char('j') => d.scroll = (d.scroll + 1).min(last),
                KeyCode::PageUp => d.scroll = d.scroll.saturating_sub(page),
                KeyCode::PageDown | KeyCode::Char(' ') => d.scroll = (d.scroll + page).min(last),
                KeyCode::Home | KeyCode::Char('g') => d.scroll = 0,
                KeyCode::End | KeyCode::Char('G') => d.scroll = last,
                _ => {}
            }
            return Action::None;
        }
        match key.code {
            KeyCode::Up | KeyCode::Char('k') => self.move_selection(-1),
            KeyCode::Down | KeyCode::Char('j') => self.move_selection(1),
            KeyCode::PageUp => self.move_selection(-(page as isize)),
            KeyCode::PageDown => self.move_selection(page as isize),
            KeyCode::Home | KeyCode::Char('g') => self.move_selection(isize::MIN / 2),
            KeyCode::End | KeyCode::Char('G') => self.move_selection(isize::MAX / 2),
            KeyCode::Enter | KeyCode::Right => {
                if let Some(id) = self.selected.clone() {
                    self.message = None;
                    return Action::Open(id);
                }
            }
            _ => {}
        }
        Action::None
    }

    /// Show (or refresh) a task's detail; a refresh keeps the scroll position.
    pub fn show_detail(&mut self, id: String, lines: Vec<String>) {
        let scroll = match &self.detail {
            Some(d) if d.id == id => d.scroll.min(lines.len().saturating_sub(1)),
            _ => 0,
        };
        self.detail = Some(Detail { id, lines, scroll });
    }

    pub fn render(&self, f: &mut Frame) {
        let s = &self.snapshot;
        let [header, body, footer] = Layout::vertical([
            // A third header line for the cluster's hosts, when there is a cluster.
            Constraint::Length(2 + u16::from(s.hosts.is_some())),
            Constraint::Fill(1),
            Constraint::Length(1),
        ])
        .areas(f.area());
        let title = format!("orchestrate watch · {} · event {}", s.source, s.seq);
        f.render_widget(
            Paragraph::new(vec![
                Line::styled(
                    format!("{title}   {}", s.counts_line()),
                    Style::new().add_modifier(Modifier::BOLD),
                ),
                Line::raw(s.agents_line()),
                Line::raw(s.hosts.clone().unwrap_or_default()),
            ]),
            header,
        );
        match &self.detail {
            Some(d) => self.render_detail(f, body, d),
            None => self.render_table(f, body),
        }
        let keys = if self.detail.is_some() {
            "↑↓ PgUp PgDn scroll · Esc back · c cancel · r retry · q quit"
        } else {
            "↑↓ select · Enter open · c cancel · r retry · q quit"
        };
        let text = match (&self.confirm, &self.message) {
            (Some(Ask::Cancel(id)), _) => format!("cancel {id}? y/n"),
            (Some(Ask::Retry(id)), _) => format!("retry {id}? y/n"),
            (None, Some(m)) => format!("{} · {keys}", one_line(m)),
            (None, None) => keys.to_string(),
        };
        let style = if self.confirm.is_some() {
            Style::new().fg(Color::Black).bg(Color::Yellow)
        } else {
            Style::new().add_modifier(Modifier::REVERSED)
        };
        f.render_widget(Paragraph::new(text).style(style), footer);
    }

    fn render_table(&self, f: &mut Frame, area: Rect) {
        let tasks = &self.snapshot.tasks;
        if tasks.is_empty() {
            f.render_widget(
                Paragraph::new("no tasks yet: drop a task file into tasks/pending/")
                    .block(Block::new().borders(Borders::TOP)),
                area,
            );
            return;
        }
        let narrow = area.width < NARROW;
        let id_width = tasks
            .iter()
            .map(|t| t.id.chars().count())
            .max()
            .unwrap_or(2)
            .clamp(2, 24) as u16;
        let cells = |t: &TaskLine| -> Vec<Cell> {
            let state = Cell::from(t.state.clone()).style(state_style(&t.state));
            let mut v = vec![Cell::from(t.id.clone()), state];
            if !narrow {
                v.push(Cell::from(t.agent.clone().unwrap_or_else(|| "-".into())));
            }
            v.push(Cell::from(elapsed(t.elapsed_seconds)));
            if !narrow {
                v.push(Cell::from(cost(t.cost_usd)));
            }
            v.push(Cell::from(one_line(t.note.as_deref().unwrap_or(""))));
            v
        };
        let (header, widths) = if narrow {
            (
                vec!["ID", "STATE", "TIME", "NOTE"],
                vec![
                    Constraint::Length(id_width),
                    Constraint::Length(9),
                    Constraint::Length(6),
                    Constraint::Fill(1),
                ],
            )
        } else {
            (
                vec!["ID", "STATE", "AGENT", "ELAPSED", "COST", "NOTE"],
                vec![
                    Constraint::Length(id_width),
                    Constraint::Length(9),
                    Constraint::Length(10),
                    Constraint::Length(7),
                    Constraint::Length(7),
                    Constraint::Fill(1),
                ],
            )
        };
        let table = Table::new(tasks.iter().map(|t| Row::new(cells(t))), widths)
            .header(Row::new(header).style(Style::new().add_modifier(Modifier::UNDERLINED)))
            .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED))
            .highlight_symbol("▶ ")
            .block(Block::new().borders(Borders::TOP));
        let mut state = TableState::default().with_selected(self.selected_index());
        f.render_stateful_widget(table, area, &mut state);
    }

    fn render_detail(&self, f: &mut Frame, area: Rect, d: &Detail) {
        let lines: Vec<Line> = d
            .lines
            .iter()
            .skip(d.scroll)
            .map(|l| Line::raw(l.as_str()))
            .collect();
        let title = format!(
            " {} · line {}/{} ",
            d.id,
            (d.scroll + 1).min(d.lines.len()),
            d.lines.len()
        );
        f.render_widget(
            Paragraph::new(lines)
                .wrap(Wrap { trim: false })
                .block(Block::new().borders(Borders::TOP).title(title)),
            area,
        );
    }
}

fn state_style(state: &str) -> Style {
    match state {
        "running" => Style::new().fg(Color::Yellow),
        "failed" => Style::new().fg(Color::Red),
        "completed" => Style::new().fg(Color::Green),
        _ => Style::new(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ratatui::Terminal;
    use ratatui::backend::TestBackend;
    use ratatui::crossterm::event::KeyEvent;

    use super::*;
    use crate::tui::model::AgentLine;

    fn task(id: &str, state: &str, agent: Option<&str>, secs: Option<u64>, note: &str) -> TaskLine {
        TaskLine {
            id: id.into(),
            state: state.into(),
            agent: agent.map(String::from),
            elapsed_seconds: secs,
            cost_usd: agent.map(|_| 0.25),
            note: (!note.is_empty()).then(|| note.to_string()),
            attempts: 1,
        }
    }

    fn snapshot() -> Snapshot {
        let counts: BTreeMap<String, usize> = [
            ("pending", 1),
            ("running", 1),
            ("completed", 1),
            ("failed", 1),
        ]
        .iter()
        .map(|(s, n)| (s.to_string(), *n))
        .collect();
        Snapshot {
            source: "local",
            counts,
            tasks: vec![
                task("task_004", "running", Some("fake"), Some(75), ""),
                task("task_003", "pending", None, None, "waits for task_002"),
                task(
                    "task_002",
                    "failed",
                    Some("fake"),
                    Some(3),
                    "exit code 1\nmore",
                ),
                task("task_001", "completed", Some("fake"), Some(12), ""),
            ],
            agents: vec![AgentLine {
                name: "fake".into(),
                running: 1,
                max_instances: 8,
                cooldown: Some("rate_limited until 2026-11-30T17:00:00Z".into()),
            }],
            seq: 9,
            hosts: None,
        }
    }

    /// The screen as text, one string per row, trailing blanks removed.
    fn screen(app: &App, w: u16, h: u16) -> Vec<String> {
        let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
        t.draw(|f| app.render(f)).unwrap();
        let buf = t.backend().buffer();
        (0..h)
            .map(|y| {
                let row: String = (0..w).map(|x| buf[(x, y)].symbol().to_string()).collect();
                row.trim_end().to_string()
            })
            .collect()
    }

    fn key(c: KeyCode) -> KeyEvent {
        KeyEvent::from(c)
    }

    #[test]
    fn the_table_shows_counts_agents_and_every_task() {
        let app = App::new(snapshot(), false);
        assert_eq!(
            screen(&app, 100, 10),
            [
                "orchestrate watch · local · event 9   running 1  pending 1  failed 1  completed 1",
                "agents: fake 1/8 (rate_limited until 2026-11-30T17:00:00Z)",
                "────────────────────────────────────────────────────────────────────────────────────────────────────",
                "  ID       STATE     AGENT      ELAPSED COST    NOTE",
                "▶ task_004 running   fake       1m15s   $0.25",
                "  task_003 pending   -          -       -       waits for task_002",
                "  task_002 failed    fake       3s      $0.25   exit code 1 …",
                "  task_001 completed fake       12s     $0.25",
                "",
                "↑↓ select · Enter open · c cancel · r retry · q quit",
            ]
        );
    }

    #[test]
    fn a_narrow_screen_drops_agent_and_cost_for_the_note() {
        let app = App::new(snapshot(), false);
        let s = screen(&app, 50, 8);
        assert_eq!(s[3], "  ID       STATE     TIME   NOTE");
        assert_eq!(s[5], "  task_003 pending   -      waits for task_002");
    }

    #[test]
    fn cancel_asks_first_and_only_yes_acts() {
        let mut app = App::new(snapshot(), false);
        assert_eq!(app.handle_key(key(KeyCode::Down)), Action::None);
        assert_eq!(app.handle_key(key(KeyCode::Char('c'))), Action::None);
        assert_eq!(screen(&app, 60, 6)[5], "cancel task_003? y/n");
        assert_eq!(app.handle_key(key(KeyCode::Char('n'))), Action::None);
        assert!(app.confirm.is_none());
        app.handle_key(key(KeyCode::Char('r')));
        assert_eq!(screen(&app, 60, 6)[5], "retry task_003? y/n");
        assert_eq!(
            app.handle_key(key(KeyCode::Char('y'))),
            Action::Retry("task_003".into())
        );
        // One action at a time.
        app.handle_key(key(KeyCode::Char('c')));
        assert!(app.confirm.is_none());
        assert!(screen(&app, 80, 6)[5].starts_with("wait for the last action to finish"));
    }

    #[test]
    fn read_only_refuses_cancel_with_a_reason() {
        let mut app = App::new(snapshot(), true);
        app.handle_key(key(KeyCode::Char('c')));
        assert!(app.confirm.is_none());
        assert!(app.message.as_deref().unwrap().starts_with("read-only"));
    }

    #[test]
    fn enter_opens_the_detail_which_scrolls_and_esc_goes_back() {
        let mut app = App::new(snapshot(), false);
        assert_eq!(
            app.handle_key(key(KeyCode::Enter)),
            Action::Open("task_004".into())
        );
        let lines: Vec<String> = (1..=20).map(|i| format!("line {i}")).collect();
        app.show_detail("task_004".into(), lines);
        let s = screen(&app, 40, 8);
        assert_eq!(s[2], " task_004 · line 1/20 ──────────────────");
        assert_eq!(s[3], "line 1");
        app.handle_key(key(KeyCode::PageDown));
        let s = screen(&app, 40, 8);
        assert_eq!(s[3], "line 11");
        app.handle_key(key(KeyCode::End));
        assert_eq!(screen(&app, 40, 8)[3], "line 20");
        // A refresh keeps the place.
        app.show_detail(
            "task_004".into(),
            (1..=25).map(|i| format!("line {i}")).collect(),
        );
        assert_eq!(screen(&app, 40, 8)[3], "line 20");
        assert_eq!(app.handle_key(key(KeyCode::Esc)), Action::None);
        assert!(app.detail.is_none());
        assert_eq!(app.handle_key(key(KeyCode::Char('q'))), Action::Quit);
    }

    #[test]
    fn the_selection_follows_its_task_across_refreshes() {
        let mut app = App::new(snapshot(), false);
        app.handle_key(key(KeyCode::Down));
        app.handle_key(key(KeyCode::Down));
        assert_eq!(app.selected.as_deref(), Some("task_002"));
        let mut s = snapshot();
        s.tasks.rotate_left(1);
        app.update(s);
        assert_eq!(app.selected.as_deref(), Some("task_002"));
        let mut s = snapshot();
        s.tasks.rotate_left(1);
        s.tasks.retain(|t| t.id != "task_002");
        // Gone: the row it was on (the second) is selected.
        app.update(s);
        assert_eq!(app.selected.as_deref(), Some("task_001"));
    }

    #[test]
    fn an_empty_project_says_how_to_start() {
        let mut s = snapshot();
        s.tasks.clear();
        let app = App::new(s, false);
        assert_eq!(
            screen(&app, 70, 5)[3],
            "no tasks yet: drop a task file into tasks/pending/"
        );
    }
}
