"""``huiying demo``: the Longgang demo directory and a scenario built from the seed report, replayed
against the four running services with a movable clock (services/common/timeutil.py), so that in a
minute or two referrals, returns, extensions, replies, unsatisfied ratings, reminders, agenda items,
joint supervision and special inspections all happen — then a summary, and the board to look at.

Everything goes through the services' own interfaces (RPC, as the CLI does); nothing is written to
their tables directly. The demo runs its own stack in ``var/demo`` (its own SQLite database, logs
and clock), so it never moves the clock of, or mixes cases into, a real deployment.
"""

import time as clock_time
from collections import Counter
from datetime import datetime, time, timedelta
from pathlib import Path

import yaml

from services.common import config as settings
from services.common.timeutil import CST, iso, now, set_clock
from services.common.workdays import WorkingCalendar

DATA = settings.PROJECT_ROOT / "data"
DIRECTORY = DATA / "longgang-directory.yaml"
CONSULTATION = DATA / "examples" / "haijixing-58-suggestions.csv"
START = datetime(2026, 10, 12, 9, 0, tzinfo=CST)  # the Monday after the National Day holiday

# 12345 hotline tickets and member workstations' suggestions, from the seed report's cases.
TICKETS = [
    # 大芬油画村 renovation (布吉): the works, the scaffolding, the visitors' parking
    ("T-0001", "大芬油画村改造施工噪音扰民", "大芬油画村改造工地夜间施工噪音大，影响居民休息", "布吉街道", 3000),
    ("T-0002", "大芬油画村围挡占道", "大芬油画村改造围挡占用人行道，游客和居民只能走机动车道", "布吉街道", None),
    ("T-0003", "大芬油画村游客停车难", "大芬油画村周末游客多，周边停车位不足，车辆乱停", "布吉街道", None),
    # 横岗 sponge park: standing water after rain, a wide-ranging problem
    (
        "T-0004",
        "横岗海绵公园雨后积水",
        "横岗海绵城市公园下雨后大面积积水，步道被淹，周边小区出行受影响",
        "横岗街道",
        12000,
    ),
    ("T-0005", "横岗海绵公园排水设施堵塞", "海绵公园雨水花园排水口堵塞，积水发臭", "横岗街道", None),
    # AEDs in public places
    ("T-0006", "地铁站缺少AED除颤仪", "布吉地铁站人流量大，没有配置AED自动体外除颤器", "布吉街道", None),
    ("T-0007", "龙城广场建议配置AED", "龙城广场晨练老人多，建议配置AED并培训急救员", "龙城街道", None),
    ("T-0008", "社区公园AED设备损坏", "坂田社区公园的AED设备显示故障，无人维修", "坂田街道", None),
    # nurseries (托育)
    ("T-0009", "普惠托育机构名额不足", "南湾街道普惠性托育机构名额太少，双职工家庭孩子没人带", "南湾街道", None),
    ("T-0010", "托育机构收费过高", "吉华街道托育机构收费每月五千以上，建议增加普惠托位", "吉华街道", None),
    # dead-end roads (断头路)
    ("T-0011", "坂田断头路打通", "坂田街道五和大道辅道是断头路，早晚高峰绕行严重拥堵", "坂田街道", 8000),
    ("T-0012", "吉华断头路影响出行", "吉华街道甘李路断头路多年未打通，居民出行不便", "吉华街道", None),
    ("T-0013", "南湾断头路积水", "南湾街道丹竹头断头路下雨积水，行人无法通行", "南湾街道", None),
    # everyday matters
    ("T-0014", "路灯不亮", "龙岗街道南联社区路灯一周不亮，夜间行人不安全", "龙岗街道", None),
    ("T-0015", "垃圾清运不及时", "园山街道保安社区垃圾站清运不及时，异味严重", "园山街道", None),
    ("T-0016", "小区周边违建", "宝龙街道同乐社区有人在绿化带上搭建违建", "宝龙街道", None),
]
MEMBER_SUGGESTIONS = [
    (
        "W-0001",
        "建议在学校周边增设AED",
        "委员调研发现辖区中小学AED配置率低，建议纳入校园安全建设",
        "平湖街道",
        "ws-pinghu",
    ),
    ("W-0002", "加快推进托育服务体系建设", "委员建议街道党群服务中心嵌入普惠托育点", "龙岗街道", "ws-longgang"),
]


class Demo:
    """One replay: ``proxy`` is a nameko ClusterRpcProxy, ``clock`` the clock file the services read,
    ``say`` prints a line, ``settle`` waits until the services have handled what was sent."""

    def __init__(self, proxy, clock: Path, say, settle):
        self.proxy, self.clock, self.say, self.settle = proxy, clock, say, settle
        self.cases: dict[str, str] = {}  # external id → case id
        self.calendar = WorkingCalendar.from_file(settings.rules_dir() / "calendar" / "holidays.yaml")
        self.tally = Counter()

    def at(self, moment: datetime, what: str) -> None:
        """Move every service's clock to ``moment`` (never backwards: a deadline the routing rules
        made shorter than the script expects just brings the next step forward)."""
        moment = max(moment, now() + timedelta(minutes=1))
        set_clock(self.clock, moment)
        self.say(f"\n{moment.astimezone(CST):%Y-%m-%d %a %H:%M}  {what}")

    def working_day_before(self, day):
        day -= timedelta(days=1)
        while not self.calendar.is_working_day(day):
            day -= timedelta(days=1)
        return day

    # --- steps -------------------------------------------------------------------------------

    def run(self) -> dict:
        self.at(START, "the directory, and what came in")
        directory = yaml.safe_load(DIRECTORY.read_text(encoding="utf-8"))
        self.proxy.intake.load_directory(directory)
        self.staff_key = self.proxy.intake.create_credential("staff", "demo-staff")["key"]
        self.submit_consultation()
        self.submit_tickets()
        self.settle()
        referrals = self.referrals()
        self.say(f"  routed: {len(referrals)} referrals to {len({r['department'] for r in referrals})} departments")

        self.at(START + timedelta(days=1, hours=1), "departments sign for their referrals; one is returned, twice")
        self.accept_all(except_cases={self.cases["T-0012"]})
        self.return_twice("T-0012")
        self.settle()

        self.at(START + timedelta(days=3), "大芬油画村: the department asks for more time, and gets it")
        for referral in self.referrals_of("T-0001"):
            self.step(referral["id"], "extension", {"working_days": 10, "reason": "改造工程分期实施，需协调施工单位"})
            self.step(referral["id"], "extension_decision", {"grant": True, "note": "同意延期10个工作日"})
        self.settle()

        first_due = min(
            datetime.fromisoformat(r["due_at"]) for r in self.referrals() if r["status"] in ("referred", "accepted")
        ).astimezone(CST)
        reminder_day = self.working_day_before(first_due.date())
        self.at(datetime.combine(reminder_day, time(8, 30), CST), "a working day before the first deadlines: 催办")
        self.sweep()
        self.at(datetime.combine(reminder_day, time(9, 5), CST), "the morning's reminders go out as one digest each")
        self.tally["digests"] += len(self.proxy.notify.send_digests(iso(now()))["digests"])
        self.settle()

        self.at(datetime.combine(reminder_day, time(10, 0), CST), "replies, and what the people who raised them think")
        consultation = [ext for ext in self.cases if ext.startswith("PH-")]
        for external_id in consultation[:-6]:  # the consultation's outcome: most are taken up
            self.reply(external_id, "已采纳：海吉星市场货车错峰通行，增设信号灯，人车分流天桥列入计划")
        answered = ["T-0006", "T-0007", "T-0008", "T-0014", "T-0015", "T-0009", "W-0001"]
        for external_id in answered:
            self.reply(external_id, "已现场核查并完成整改，详见答复函")
        self.settle()
        for external_id in ["T-0006", "T-0007", "T-0014", "W-0001", *consultation[:10]]:
            self.rate(external_id, "满意")
        self.rate("T-0008", "基本满意")
        self.rate("T-0015", "不满意")  # 重办: back to the department
        self.rate("T-0009", "不满意")
        self.settle()

        self.at(
            datetime.combine(reminder_day, time(10, 0), CST) + timedelta(days=4),
            "the redone ones are answered again; one is still not satisfied",
        )
        for external_id in ["T-0015", "T-0009"]:
            self.reply(external_id, "已重新办理并回访")
        self.settle()
        self.rate("T-0015", "满意")
        self.rate("T-0009", "不满意")  # twice: onto the agenda
        self.settle()

        overdue_day = self.calendar.add_working_days(first_due.date(), 6)
        self.at(
            datetime.combine(overdue_day, time(8, 30), CST),
            "five working days overdue: agenda, joint supervision, special supervisors",
        )
        self.sweep()

        self.at(datetime.combine(overdue_day, time(15, 0), CST), "late replies to the last of the consultation")
        for external_id in consultation[-6:-3]:
            self.reply(external_id, "已协调交警部门增加早高峰执勤")
        self.settle()

        self.at(START + timedelta(days=35), "twenty working days on: special inspection")
        self.sweep()
        self.settle()
        return self.summary()

    def submit_consultation(self) -> None:
        from huiying import importer

        header, rows = importer.read_rows(CONSULTATION)
        mapping = importer.column_map(CONSULTATION, header)
        submissions = [importer.row_to_submission(cells, mapping, "consultation-2026-10") for _, cells in rows]
        results = self.proxy.intake.submit_cases(submissions, "import")
        for submission, result in zip(submissions, results, strict=True):
            if "error" in result:
                raise RuntimeError(f"demo suggestion {submission['external_id']} refused: {result['error']}")
            self.cases[submission["external_id"]] = result["id"]
        self.say(f"  协商议事会 on 海吉星 market traffic: {len(results)} suggestions imported")

    def submit_tickets(self) -> None:
        rows = [
            {
                "source": "hotline-12345",
                "external_id": ext,
                "title": title,
                "description": text,
                "street": street,
                "residents_affected": affected,
                "reporter_phone": f"1390000{n:04d}",
            }
            for n, (ext, title, text, street, affected) in enumerate(TICKETS)
        ] + [
            {
                "source": "member-workstation",
                "external_id": ext,
                "title": title,
                "description": text,
                "street": street,
                "workstation": workstation,
                "kind": "proposal",
            }
            for ext, title, text, street, workstation in MEMBER_SUGGESTIONS
        ]
        for row, result in zip(rows, self.proxy.intake.submit_cases(rows, "import"), strict=True):
            if "error" in result:
                raise RuntimeError(f"demo ticket {row['external_id']} refused: {result['error']}")
            self.cases[row["external_id"]] = result["id"]
        self.say(f"  12345 hotline: {len(TICKETS)} tickets; member workstations: {len(MEMBER_SUGGESTIONS)} suggestions")

    def referrals(self, status=None) -> list:
        return self.proxy.routing.list_referrals(status, None, None)

    def referrals_of(self, external_id: str, status=None) -> list:
        return self.proxy.routing.list_referrals(status, None, self.cases[external_id])

    def step(self, referral_id: str, step: str, params: dict | None = None) -> dict:
        self.tally[step] += 1
        return self.proxy.routing.referral_step(referral_id, step, params or {})

    def accept_all(self, except_cases) -> None:
        for referral in self.referrals("referred"):
            if referral["case_id"] not in except_cases:
                self.step(referral["id"], "accept")

    def return_twice(self, external_id: str) -> None:
        """退回: "not ours", says the lead department, and routing refers the case afresh without
        it (or, with no department left, staff route it from the triage list); then again."""
        case_id = self.cases[external_id]
        for reason in ("该路段不属于本单位职责范围", "请区政府明确牵头单位"):
            active = [r for r in self.referrals_of(external_id) if r["status"] in ("referred", "accepted")]
            if not active:
                self.proxy.routing.route_triaged_case(case_id, ["gws"], "gws")
                self.tally["rerouted"] += 1
                active = self.referrals_of(external_id, "referred")
            lead = next((r for r in active if r.get("lead")), active[0])
            self.step(lead["id"], "return", {"reason": reason})
            self.settle()

    def reply(self, external_id: str, result: str) -> None:
        for referral in self.referrals_of(external_id):
            if referral["status"] in ("referred", "accepted"):
                self.step(referral["id"], "reply", {"result": result})

    def rate(self, external_id: str, rating: str) -> None:
        self.proxy.routing.record_feedback(self.cases[external_id], rating)
        self.tally[f"rated {rating}"] += 1

    def sweep(self) -> None:
        result = self.proxy.supervision.sweep(iso(now()))
        actions = Counter(d["action"] for d in result["decisions"])
        self.say(
            f"  sweep: {result['evaluated']} cases evaluated; "
            + (", ".join(f"{action} ×{n}" for action, n in sorted(actions.items())) or "nothing to do")
        )
        self.settle()

    # --- the summary --------------------------------------------------------------------------

    def summary(self) -> dict:
        agenda = self.proxy.supervision.list_agenda(None, None)
        statuses, decisions = Counter(), Counter()
        for case_id in self.cases.values():
            for delivery in self.proxy.notify.deliveries_for(case_id):
                statuses[delivery["status"]] += 1
            # supervision's own account: its sweeps, and its evaluations as events came in
            decisions.update(e["action"] for e in self.proxy.supervision.get_case_record(case_id)["escalations"])
        return {
            "demo_time": iso(now()),
            "cases": len(self.cases),
            "referrals": len(self.referrals()),
            "steps": {k: self.tally[k] for k in ("accept", "return", "rerouted", "extension", "reply")},
            "ratings": {k[6:]: v for k, v in self.tally.items() if k.startswith("rated ")},
            "decisions": dict(sorted(decisions.items())),
            "digests": self.tally["digests"],
            "agenda": dict(Counter(item["kind"] for item in agenda)),
            "notifications": dict(statuses),
            "staff_key": self.staff_key,
            "board": f"http://{settings.http_address('supervision')}/board/",
        }


def wait_until_settled(amqp_uri: str, queue_names: list[str], quiet_seconds: float = 1.5, timeout: float = 60) -> None:
    """Until every event queue has been empty for ``quiet_seconds`` (supervision evaluates half a
    second after a batch; notify sends right after recording)."""
    from huiying import stack

    deadline, quiet_since = clock_time.monotonic() + timeout, None
    while clock_time.monotonic() < deadline:
        depths = stack.queue_depths(amqp_uri, queue_names)
        if all(not (q["messages"] or 0) for q in depths.values()):
            quiet_since = quiet_since or clock_time.monotonic()
            if clock_time.monotonic() - quiet_since >= quiet_seconds:
                return
        else:
            quiet_since = None
        clock_time.sleep(0.2)
    raise TimeoutError(f"the services did not catch up within {timeout:.0f}s; see {settings.var_dir() / 'log'}")
