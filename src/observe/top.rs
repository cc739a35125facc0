//! `minimesh top`: the edges live, full screen, refreshed every second.

use super::edges::{self, Edge, Snapshot};
use super::{cells, header, snapshot};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::widgets::{Block, Paragraph, Row, Table, TableState};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

const REFRESH: Duration = Duration::from_secs(1);

pub(super) async fn run(addrs: Vec<String>, window: Duration) -> anyhow::Result<()> {
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        // ratatui::init also restores the terminal if anything panics.
        let mut terminal = ratatui::try_init()?;
        let result = ui(&mut terminal, &handle, &addrs, window);
        ratatui::restore();
        result
    })
    .await?
}

struct State {
    history: VecDeque<(Instant, Snapshot)>,
    status: String,
    table: TableState,
}

fn ui(
    terminal: &mut ratatui::DefaultTerminal,
    handle: &tokio::runtime::Handle,
    addrs: &[String],
    window: Duration,
) -> anyhow::Result<()> {
    let mut state = State {
        history: VecDeque::new(),
        status: "reading the proxies…".to_owned(),
        table: TableState::default().with_selected(Some(0)),
    };
    let mut next_scrape = Instant::now();
    loop {
        if Instant::now() >= next_scrape {
            next_scrape = Instant::now() + REFRESH;
            match handle.block_on(snapshot(addrs)) {
                Ok((snapshot, errors)) => {
                    let now = Instant::now();
                    state.history.push_back((now, snapshot));
                    while state.history.len() > 2
                        && state
                            .history
                            .get(1)
                            .is_some_and(|(at, _)| now.duration_since(*at) >= window)
                    {
                        state.history.pop_front();
                    }
                    state.status = if errors.is_empty() {
                        format!("{} proxies", addrs.len())
                    } else {
                        format!(
                            "{} of {} proxies: {}",
                            addrs.len() - errors.len(),
                            addrs.len(),
                            errors.join("; ")
                        )
                    };
                }
                Err(err) => state.status = format!("{err:#}"),
            }
        }
        let (rows, methods) = current_rows(&mut state);
        terminal.draw(|frame| draw(frame, &mut state, &rows, &methods, window))?;
        let wait = next_scrape.saturating_duration_since(Instant::now());
        if event::poll(wait)?
            && let Event::Key(key) = event::read()?
            && key.kind == KeyEventKind::Press
        {
            match key.code {
                KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => {
                    return Ok(());
                }
                KeyCode::Down | KeyCode::Char('j') => state.table.select_next(),
                KeyCode::Up | KeyCode::Char('k') => state.table.select_previous(),
                _ => {}
            }
        }
    }
}

/// The edges over the history kept, and the selected edge's methods.
fn current_rows(state: &mut State) -> (Vec<Edge>, Vec<Edge>) {
    let (Some((first_at, first)), Some((last_at, last))) =
        (state.history.front(), state.history.back())
    else {
        return (Vec::new(), Vec::new());
    };
    let window_s = last_at.duration_since(*first_at).as_secs_f64();
    let rows = edges::edges(first, last, window_s, false);
    if let Some(selected) = state.table.selected()
        && selected >= rows.len()
    {
        state.table.select(Some(rows.len().saturating_sub(1)));
    }
    let methods = match state.table.selected().and_then(|i| rows.get(i)) {
        Some(edge) => edges::edges(first, last, window_s, true)
            .into_iter()
            .filter(|m| m.from == edge.from && m.to == edge.to)
            .collect(),
        None => Vec::new(),
    };
    (rows, methods)
}

fn draw(
    frame: &mut ratatui::Frame,
    state: &mut State,
    rows: &[Edge],
    methods: &[Edge],
    window: Duration,
) {
    let [title, edges_area, methods_area, status] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Percentage(55),
        Constraint::Min(4),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    frame.render_widget(
        Paragraph::new(format!(
            "minimesh top — edges, busiest first (rates over up to {}); ↑/↓ select, q quits",
            humantime::format_duration(window)
        ))
        .style(Style::new().add_modifier(Modifier::BOLD)),
        title,
    );
    let widths = |n: usize| -> Vec<Constraint> {
        let mut widths = vec![Constraint::Length(10), Constraint::Length(10)];
        if n == 9 {
            widths.push(Constraint::Min(30));
        }
        widths.extend([
            Constraint::Length(10),
            Constraint::Length(9),
            Constraint::Length(9),
            Constraint::Length(9),
            Constraint::Length(9),
            Constraint::Length(9),
        ]);
        widths
    };
    let edge_table = Table::new(rows.iter().map(|r| Row::new(cells(r, false))), widths(8))
        .header(Row::new(header(false)).style(Style::new().add_modifier(Modifier::BOLD)))
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED))
        .block(Block::bordered().title(" edges "));
    frame.render_stateful_widget(edge_table, edges_area, &mut state.table);
    let method_table = Table::new(methods.iter().map(|r| Row::new(cells(r, true))), widths(9))
        .header(Row::new(header(true)).style(Style::new().add_modifier(Modifier::BOLD)))
        .block(Block::bordered().title(" methods of the selected edge "));
    frame.render_widget(method_table, methods_area);
    frame.render_widget(Paragraph::new(state.status.clone()), status);
}
